"""gRPC contracts (.proto) and the Python code generated from them by scripts/gen_protos.sh."""
