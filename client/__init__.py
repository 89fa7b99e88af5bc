"""A small client for the served classifiers: predictions and the model-version workflow (`python -m client`)."""
from client.api import ServerError, TorchServeClient

__all__ = ["ServerError", "TorchServeClient"]
