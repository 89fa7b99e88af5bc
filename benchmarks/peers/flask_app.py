"""The seeds' Flask server: one forward pass per request. `python -m benchmarks.peers.flask_app --port N` runs
Flask's own threaded server; `gunicorn -w 2 benchmarks.peers.flask_app:app` runs it the production way."""
from __future__ import annotations

import argparse

from flask import Flask, Response, request

from benchmarks.peers.predictor import Predictor

app = Flask(__name__)
predictor = Predictor()


@app.route("/predictions/cifar10", methods=["POST", "PUT"])
def predict() -> Response:
    [(status, body)] = predictor.predict([request.get_data()])
    return Response(body, status=status, mimetype="application/json")


@app.route("/ping")
def ping() -> Response:
    return Response('{"status":"Healthy"}', mimetype="application/json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    app.run(host="127.0.0.1", port=parser.parse_args().port, threaded=True)
