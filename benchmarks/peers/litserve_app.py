"""LitServe serving the same predictor with batching (8 requests or 5 ms), two inference workers on the CPU.

LitServe picks the endpoint's body type from `decode_request`'s annotation: typing `request` as bytes is what
gives a raw-body route (its default parses JSON). `python -m benchmarks.peers.litserve_app --port N`."""
from __future__ import annotations

import argparse
import json

import litserve as ls

from benchmarks.peers.predictor import Predictor


class Cifar10API(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.predictor = Predictor()

    def decode_request(self, request: bytes) -> bytes:
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
