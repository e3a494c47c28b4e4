"""Generated protobuf/gRPC modules of the semantic memory service; regenerate with `make proto`."""
