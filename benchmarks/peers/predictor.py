"""The work every peer server does per image, built from the project's own pieces so only the server differs:
decode (handlers.imaging), normalise (models.specs), forward, softmax, top-k, compact JSON."""
from __future__ import annotations

import json

import numpy as np
import torch

from handlers.imaging import InputError, Limits, decode_image
from models import zoo
from models.specs import SPECS
from serving.catalog import SHIPPED

TOPK = 5


class Predictor:
    def __init__(self, model: str = "cifar10", version: str = "1.0") -> None:
        torch.set_num_threads(1)  # one process per core, as the TorchServe workers run
        shipped = next(v for v in SHIPPED if v.model == model and v.version == version)
        self.spec = SPECS[model]
        self.model = zoo.get(shipped.arch).build()
        self.model.load_state_dict(torch.load(shipped.weights, map_location="cpu", weights_only=True))
        self.model.eval()
        self.limits = Limits()

    def predict(self, bodies: list[bytes]) -> list[tuple[int, bytes]]:
        """(status, JSON body) per image; a bad image is a 400 and does not affect the others."""
        pixels, slots, answers = [], [], []
        for body in bodies:
            try:
                pixels.append(decode_image(body, self.spec.image_size, self.spec.channels, self.limits,
                                           self.spec.light_on_dark))
                slots.append(len(pixels) - 1)
            except InputError as exc:
                slots.append(exc)
        if pixels:
            x = self.spec.normalize(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2))
            with torch.inference_mode():
                values, indices = torch.softmax(self.model(x), dim=1).topk(TOPK, dim=1)
            values, indices = values.tolist(), indices.tolist()
        for slot in slots:
            if isinstance(slot, InputError):
                answers.append((slot.status, json.dumps(slot.body()).encode()))
            else:
                top = {self.spec.classes[c]: round(p, 6) for c, p in zip(indices[slot], values[slot], strict=True)}
                answers.append((200, json.dumps(top, separators=(",", ":")).encode()))
        return answers
