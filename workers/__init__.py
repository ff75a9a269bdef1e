"""Workers: per-node gRPC workers running layer ranges (the runtime issue)."""
