"""Building model archives and running TorchServe: what `make archive`, `make serve` and `make stop` call."""
