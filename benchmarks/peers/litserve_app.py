"""LitServe serving the same predictor with batching (8 requests or 5 ms), two inference workers on the CPU.

LitServe builds its FastAPI route from `decode_request`'s annotation, so the annotation must be a real object
(no `from __future__ import annotations` here): plain `bytes` becomes a query parameter and the default parses
JSON, while `Annotated[bytes, Body()]` is FastAPI's raw body for non-JSON content types.
`python -m benchmarks.peers.litserve_app --port N`."""
import argparse
import json
from typing import Annotated

import litserve as ls
from fastapi import Body

from benchmarks.peers.predictor import Predictor


class Cifar10API(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.predictor = Predictor()

    def decode_request(self, request: Annotated[bytes, Body()]) -> bytes:
        return request

    def batch(self, inputs: list[bytes]) -> list[bytes]:
        return inputs

    def predict(self, bodies: list[bytes]) -> list[dict]:
        return [json.loads(body) for _, body in self.predictor.predict(bodies)]

    def unbatch(self, outputs: list[dict]) -> list[dict]:
        return outputs

    def encode_response(self, output: dict) -> dict:
        return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    api = Cifar10API(max_batch_size=8, batch_timeout=0.005, api_path="/predictions/cifar10")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=2, timeout=30)
    server.run(host="127.0.0.1", port=parser.parse_args().port, generate_client_file=False)
