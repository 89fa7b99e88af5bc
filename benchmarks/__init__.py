"""Load, soak and speed measurements against a running server (`make soak`, `make bench`)."""
