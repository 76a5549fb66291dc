"""What only the server process runs: the global state's bookkeeping, the gRPC service and server, the data plane's server half."""
