"""What both sides share: message framing and checksums, channel options, the data plane's frames, the emulated link."""
