"""Export shipped weights to TorchScript (trace) and ONNX (dynamic batch axis), each checked against eager.

    python -m training.export --weights models/weights/cifar10_lenet.pt --out-dir exports/

The check runs the eager model, the traced module and onnxruntime on the same batch of real-shaped inputs
and fails (assert_allclose) if any output differs beyond float tolerance, so an export that loads but computes
something else never ships.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from models import zoo
from models.specs import SPECS

RTOL, ATOL = 1e-4, 1e-5


def load_eager(weights: Path) -> tuple[torch.nn.Module, str]:
    card = json.loads(weights.with_suffix(".json").read_text())
    model = zoo.get(card["architecture"]["name"]).build()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval(), card["model"]


def export(weights: Path, out_dir: Path, check_batch: int = 16) -> tuple[Path, Path]:
    """Write `<stem>.torchscript.pt` and `<stem>.onnx`; raise AssertionError if either disagrees with eager."""
    import onnxruntime

    model, dataset = load_eager(weights)
    spec = SPECS[dataset]
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = weights.stem
    example = torch.randn(2, *spec.input_shape)
    check = spec.normalize(torch.randint(0, 256, (check_batch, *spec.input_shape), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        expected = model(check).numpy()

    script_path = out_dir / f"{stem}.torchscript.pt"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated upstream but still what TorchServe loads
        traced = torch.jit.trace(model, example)
    traced.save(str(script_path))
    with torch.inference_mode():
        np.testing.assert_allclose(torch.jit.load(str(script_path))(check).numpy(), expected, rtol=RTOL, atol=ATOL)

    onnx_path = out_dir / f"{stem}.onnx"
    torch.onnx.export(model, (example,), str(onnx_path), input_names=["images"], output_names=["scores"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}, dynamo=True,
                      external_data=False, verbose=False)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": check.numpy()})[0], expected, rtol=RTOL, atol=ATOL)
    return script_path, onnx_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, nargs="+", required=True)
    p.add_argument("--out-dir", type=Path, default=Path("exports"))
    args = p.parse_args(argv)
    for weights in args.weights:
        for path in export(weights, args.out_dir):
            print(f"{path}: {path.stat().st_size / 1024:.0f} KiB, matches eager (rtol {RTOL}, atol {ATOL})")


if __name__ == "__main__":
    main()
