"""The algorithm, pure: the plan and its modes, the client core, the server step, aggregation rules, blocks, codecs.

No threads, sockets or Lightning; imports nothing of the package but :mod:`pl_parablock.errors`."""
