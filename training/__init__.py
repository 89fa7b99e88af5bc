"""Training, evaluation and export of the networks in `models/`."""
