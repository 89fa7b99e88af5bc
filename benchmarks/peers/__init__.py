"""Peer servers for `make bench`: the same model, weights and preprocessing behind Flask, gunicorn and LitServe."""
