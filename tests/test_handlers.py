"""The real handlers, driven through initialize and handle over real unpacked archives, with no server."""
from __future__ import annotations

import base64
import gc
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.specs import CIFAR10, SPECS
from serving.catalog import SHIPPED
from tests import images, reference
from tests.answers import same, same_response, tolerance, unexplained_top1_differences
from tests.conftest import ROOT, require, version_key
from tests.images import b64

VERSIONS = [version_key(v.model, v.version) for v in SHIPPED]
CIFAR10_VERSIONS = [key for key in VERSIONS if key.startswith("cifar10")]

PNG = images.encode(images.noise(32, 32))


def mode_tolerance(h) -> float:
    """The tolerance of the numeric mode the harness's worker reports (tests/answers.py)."""
    return tolerance(h.handler.describe()["numerics"]["mode"])


def assert_topk(body: dict, k: int, labels: tuple[str, ...]) -> None:
    assert isinstance(body, dict) and len(body) == k
    assert set(body) <= set(labels)
    values = list(body.values())
    assert values == sorted(values, reverse=True)
    assert all(0 <= v <= 1 and round(v, 6) == v for v in values)


@pytest.mark.parametrize("version", CIFAR10_VERSIONS)
@pytest.mark.parametrize("fmt, params", [("PNG", {}), ("JPEG", {"quality": 90}), ("BMP", {}), ("GIF", {}),
                                         ("WEBP", {}), ("TIFF", {})])
def test_raw_bytes_in_every_format(harness, version, fmt, params):
    status, body = harness(version).one({"body": images.encode(images.noise(40, 30), fmt, **params)})
    assert status == 200
    assert_topk(body, 5, CIFAR10.classes)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_handler_runs_the_archives_own_code(harness, model_dirs, version):
    """What runs is what ships: the handler class, its helpers and the network all come from the archive."""
    h = harness(version)
    model_dir = model_dirs[version].resolve()
    for cls in (type(h.handler), type(h.handler.model)):  # the handler class and the network class
        assert Path(h.modules[cls.__module__].__file__).resolve().is_relative_to(model_dir), cls
    assert {"handlers.image_classifier", "handlers.imaging", "handlers.payload", "models.specs",
            "models.inference"} <= set(h.modules)
    assert all(Path(m.__file__).resolve().is_relative_to(model_dir) for m in h.modules.values())


def test_an_archive_missing_a_module_fails_to_load(tmp_path, monkeypatch):
    """A file the archiver forgot must fail here as it would in a worker, not be found in this repository."""
    from serving import archive
    from serving.inprocess import InProcessHandler, unpack

    staged = [m for m in archive.STAGED_MODULES if m != "handlers/payload.py"]
    monkeypatch.setattr(archive, "STAGED_MODULES", staged)
    version = next(v for v in SHIPPED if v.model == "mnist")
    model_dir = unpack(archive.build(version, tmp_path / "store"), tmp_path / "unpacked")
    with pytest.raises(ImportError, match="payload"):
        InProcessHandler(model_dir)


def test_multipart_upload_under_any_field_name(harness):
    h = harness("cifar10")
    assert h.one({"data": PNG}) == h.one({"file": PNG}) == h.one({"body": PNG})
    status, body = h.one({"first": PNG, "second": images.encode(images.noise(32, 32, seed=1))})
    assert status == 200 and isinstance(body, list) and len(body) == 2


def test_base64_text_body_with_and_without_data_url(harness):
    h = harness("cifar10")
    expected = h.one({"body": PNG})
    assert h.one({"body": b64(PNG)}) == expected
    assert h.one({"body": "data:image/png;base64," + b64(PNG)}) == expected
    assert h.one({"body": b64(PNG).encode()}) == expected  # base64 posted without a text content type
    assert h.one({"body": base64.urlsafe_b64encode(PNG).decode()}) == expected


def test_json_single_and_client_batch(harness):
    h = harness("cifar10")
    single = h.one({"body": PNG})
    assert h.one({"body": {"data": b64(PNG)}}) == single
    status, body = h.one({"body": {"data": [b64(PNG), b64(images.encode(images.noise(32, 32, seed=3)))]}})
    # A batch of 2 against one of 1: other kernels, within the tolerance of the mode the worker serves with.
    assert status == 200 and len(body) == 2 and same(body[0], single[1], mode_tolerance(h))
    # JSON that arrived as bytes (posted without a content type) is parsed the same way.
    assert h.one({"body": json.dumps({"data": b64(PNG)}).encode()}) == single


def test_seed_envelope_with_shape(harness):
    h = harness("cifar10")
    entry = {"content_type": "image/png", "data": b64(PNG), "shape": [3, 32, 32]}
    status, body = h.one({"body": {"data": [entry]}})
    assert status == 200 and body == [h.one({"body": PNG})[1]]
    status, body = h.one({"body": {"data": [dict(entry, shape=[1, 28, 28])]}})
    assert status == 400 and body["type"] == "ShapeMismatch"
    assert "[3, 32, 32]" in body["message"] and "data[0].shape" in body["message"]
    status, body = harness("mnist").one({"body": {"data": [dict(entry, shape=[28, 28])]}})
    assert status == 200


def test_kserve_v1_instances(harness):
    h = harness("cifar10")
    status, body = h.one({"body": {"instances": [{"b64": b64(PNG)}, {"image_bytes": {"b64": b64(PNG)}}]}})
    assert status == 200 and list(body) == ["predictions"] and len(body["predictions"]) == 2
    assert same(body["predictions"][0], h.one({"body": PNG})[1], mode_tolerance(h))


def test_mixed_batch_answers_each_request_on_its_own(harness):
    h = harness("cifar10")
    rows = [{"body": PNG}, {"body": b""}, {"body": {"data": b64(PNG)}}, {"body": b"\x00garbage\xff" * 10},
            {"body": images.png_claiming(50_000, 50_000)}, {"body": {"data": "not base64!"}},
            {"body": {"data": [b64(PNG), "@@"]}}, {"body": {"data": [{"data": b64(PNG), "shape": [9]}]}}]
    results = h.run(rows)
    assert [status for status, _ in results] == [200, 400, 200, 400, 413, 400, 400, 400]
    assert results[0][1] == results[2][1]
    for status, body in results[1:2] + results[3:]:
        assert body["code"] == status and body["type"] and body["message"]
    assert "empty" in results[1][1]["message"]
    assert "not a decodable image" in results[3][1]["message"]
    assert "50000×50000" in results[4][1]["message"] and results[4][1]["type"] == "ImageTooLarge"
    assert "base64" in results[5][1]["message"]
    assert results[6][1]["message"].startswith("data[1]")
    assert same_response(h.one({"body": PNG}), results[0], mode_tolerance(h))  # the same handler keeps serving


@pytest.mark.parametrize("row, message", [
    ({"body": b"<svg xmlns='http://www.w3.org/2000/svg'/>"}, "not a decodable image"),
    ({"body": {"image": b64(PNG)}}, 'no "data" or "instances"'),
    ({"body": [1, 2]}, "body[0] must be a base64 string"),
    ({"body": {"data": []}}, "empty list"),
    ({"body": {"data": {"content_type": "text/plain", "data": b64(PNG)}}}, "must be an image type"),
    ({"body": b"{not json"}, "does not parse"),
    ({"body": ("[" * 100_000).encode()}, "does not parse"),
    ({"body": images.encode(images.noise(1, 1))}, "smallest accepted side"),
    ({"body": images.encode(images.noise(32, 32))[:60]}, "not a decodable image"),
])
def test_bad_input_is_a_400_that_names_the_problem(harness, row, message):
    status, body = harness("cifar10").one(row)
    assert status == 400 and message in body["message"], body


@pytest.mark.parametrize("version", VERSIONS)
def test_a_batch_leaves_nothing_for_the_cyclic_gc(harness, version):
    """Every object a batch creates, refused requests' errors included, is freed by reference counting when the
    batch ends. A worker's heap is large and long-lived, so Python's full collections are rare: garbage only the
    cyclic GC frees piled up in the workers for as long as bad requests came (docs/serving.md, "Memory"). The
    batch holds each way of being refused (empty, undecodable, bad top-k, bad JSON, past the pixel budget) beside
    two good requests, KServe's v1 and v2 bodies with bad base64, and an explanation of an undecodable image; its
    first run is a warm-up (Pillow imports its format plugins once)."""
    h = harness(version)
    rows = [{"body": b""}, {"body": b"\x89PNG\r\n\x1a\nbroken"}, {"body": PNG}, {"body": {"data": "!!"}},
            {"body": PNG}, {"body": images.encode(images.noise(5000, 5000))}, {"body": {"instances": [{"b64": "@"}]}},
            {"body": {"inputs": [{"datatype": "BYTES", "data": ["@@@"]}]}}, {"body": b"\x89PNG\r\n\x1a\nbroken"},
            {"body": PNG}]
    headers = [{}, {}, {"X-TopK": "0"}, {}, {}, {}, {}, {}, {}, {}]
    routes = ["predictions"] * 6 + ["kserve", "kserve", "explanations", "predictions"]
    statuses = [status for status, _ in h.run(rows, headers, routes)]
    assert statuses == [400, 400, 400, 400, 200, 413, 400, 400, 400, 200], statuses
    gc.collect()
    gc.disable()
    try:
        h.run(rows, headers, routes)
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_limits_answer_413(harness):
    h = harness("cifar10", handler={"max_bytes": 1000, "max_images": 2})
    status, body = h.one({"body": images.encode(images.noise(64, 64))})
    assert status == 413 and "limit is 1,000 bytes" in body["message"]
    status, body = h.one({"body": {"data": [b64(PNG)] * 3}})
    assert status == 413 and body["type"] == "TooManyImages"


def test_topk_from_yaml_request_and_headers(harness):
    cifar, mnist = harness("cifar10"), harness("mnist")
    assert len(cifar.one({"body": PNG})[1]) == 5  # model-config/default.yaml
    assert len(mnist.one({"body": images.encode(images.digit())})[1]) == 3  # model-config/mnist.yaml
    assert len(harness("cifar10", handler={"topk": 2}).one({"body": PNG})[1]) == 2
    assert len(cifar.one({"body": {"data": b64(PNG), "topk": 1}})[1]) == 1
    assert len(cifar.one({"body": PNG, "topk": "3"})[1]) == 3  # a multipart form field
    assert len(cifar.one({"body": PNG}, {"X-TopK": "4"})[1]) == 4
    assert len(cifar.one({"body": {"data": b64(PNG), "topk": 1000}})[1]) == 10  # clamped


@pytest.mark.parametrize("bad", [0, -1, "abc", float("nan"), 2.5, True, None, [3], "-2"])
def test_bad_topk_is_a_400(harness, bad):
    row = {"body": {"data": b64(PNG), "topk": bad}} if bad is not None else {"body": PNG, "topk": b""}
    status, body = harness("cifar10").one(row)
    assert status == 400 and body["type"] == "InvalidTopK" and "positive integer" in body["message"]


def test_bad_topk_header_is_a_400(harness):
    status, body = harness("cifar10").one({"body": PNG}, {"X-TopK": "many"})
    assert status == 400 and "x-topk header must be a positive integer" in body["message"]


@pytest.mark.parametrize("image", [
    images.noise(32, 32, "RGBA"), images.noise(32, 32).convert("P"), images.noise(32, 32, "L"),
    Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)), images.noise(32, 32).convert("CMYK"),
    images.smooth(1600, 900),
], ids=["rgba", "palette", "gray", "gray16", "cmyk", "large-photo"])
def test_image_modes_become_model_input(harness, image):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    for model in ("cifar10", "mnist"):
        status, body = harness(model).one({"body": images.encode(image, fmt)})
        assert status == 200, body


def served_pixels(h, body: bytes) -> np.ndarray:
    """The uint8 pixels (H, W, C) the handler made of `body`, recovered from its normalised tensor."""
    spec = h.handler.spec
    tensor = h.preprocess([{"body": body}]).images[0]
    std, mean = torch.tensor(spec.std).view(-1, 1, 1), torch.tensor(spec.mean).view(-1, 1, 1)
    return ((tensor * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_transparent_pixels_become_white(harness):
    h = harness("cifar10")
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (200, 10, 10, 255)  # opaque red on the left, fully transparent black on the right
    pixels = served_pixels(h, images.encode(Image.fromarray(rgba, "RGBA")))
    assert (pixels[:, :16] == (200, 10, 10)).all() and (pixels[:, 16:] == 255).all()
    palette = Image.fromarray(rgba[:, :, :3]).convert("P")
    palette.info["transparency"] = palette.getpixel((31, 0))  # the black entry is transparent
    pixels = served_pixels(h, images.encode(palette, transparency=palette.info["transparency"]))
    assert (pixels[:, 16:] == 255).all() and (pixels[:, :16, 0] > 150).all()


def test_exif_orientation_is_applied(harness):
    """Stored top half black, bottom half white, with EXIF Orientation 6 (display rotated 90° clockwise): the
    model sees the displayed image, white on the left."""
    stored = np.zeros((32, 32, 3), dtype=np.uint8)
    stored[16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = served_pixels(harness("cifar10"), images.encode(stored, exif=exif.tobytes()))
    assert np.array_equal(pixels, np.rot90(stored, k=-1))
    assert not np.array_equal(pixels, stored)


def test_a_wide_image_is_centre_cropped_not_squashed(harness):
    wide = np.zeros((32, 96, 3), dtype=np.uint8)
    wide[:, 32:64] = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    wide[:, :32], wide[:, 64:] = (255, 0, 0), (0, 0, 255)  # the margins a crop removes
    assert np.array_equal(served_pixels(harness("cifar10"), images.encode(wide)), wide[:, 32:64])


def test_an_animated_gif_is_read_as_its_first_frame(harness):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    frames = [Image.new("RGB", (32, 32), colour) for colour in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert (served_pixels(harness("cifar10"), buffer.getvalue()) == colours[0]).all()


def test_a_float_tiff_is_read_as_0_to_1(harness):
    """Mode F (32-bit float) samples are 0-1, as float images and v2 FP32 tensors are: 0.5 is mid-grey."""
    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    pixels = served_pixels(harness("cifar10"), images.encode(Image.fromarray(ramp, "F"), "TIFF"))
    expected = np.floor(ramp * 255 + 0.5).astype(np.uint8)
    assert all(np.array_equal(pixels[:, :, c], expected) for c in range(3))
    eight_bit_floats = Image.fromarray(ramp * 255, "F")  # a float image of 0-255 values keeps them
    assert np.array_equal(served_pixels(harness("cifar10"), images.encode(eight_bit_floats, "TIFF")), pixels)


def test_a_huge_topk_is_clamped_to_the_classes(harness):
    status, body = harness("cifar10").one({"body": {"data": b64(PNG), "topk": 10**9}})
    assert status == 200 and list(body) and set(body) == set(CIFAR10.classes)


def test_sixteen_bit_png_is_scaled_not_clipped(harness):
    h = harness("mnist")
    eight = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)
    batch_8 = h.preprocess([{"body": images.encode(eight)}])
    batch_16 = h.preprocess([{"body": images.encode(sixteen)}])
    assert torch.equal(batch_8.images, batch_16.images)


def test_mnist_inverts_dark_digits_on_light_background(harness):
    h = harness("mnist")
    light_on_dark = h.preprocess([{"body": images.encode(images.digit())}]).images
    dark_on_light = h.preprocess([{"body": images.encode(images.digit(dark_on_light=True))}]).images
    assert torch.equal(light_on_dark, dark_on_light)
    photo = images.encode(Image.fromarray(images.digit(280, dark_on_light=True)).convert("RGB"), "JPEG")
    status, body = h.one({"body": photo})
    assert status == 200
    assert next(iter(body)) == next(iter(h.one({"body": images.encode(images.digit())})[1]))


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_handler_tensor_equals_training_tensor_and_probabilities_equal_softmax(harness, version):
    """The handler's tensor is training's tensor, and its probabilities are the calibrated softmax
    (softmax(logits / T)) of the shipped weights' logits, computed here by a network built independently from
    models/weights with the YAML's TTA level and the card's T (tests/reference.py), run in the numeric mode the
    worker reports."""
    spec = SPECS[version.model]
    h = harness(version_key(version.model, version.version))
    mode = h.handler.describe()["numerics"]["mode"]
    rng = np.random.default_rng(1)
    # MNIST-like darkness for mnist: a light border would (rightly) be inverted by the handler.
    top = 120 if spec.light_on_dark else 256
    pixels = rng.integers(0, top, (6, spec.image_size, spec.image_size, spec.channels), dtype=np.uint8)
    rows = [{"body": images.encode(p.squeeze(-1) if spec.channels == 1 else p)} for p in pixels]
    batch = h.preprocess(rows)
    training_tensor = spec.normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert torch.equal(batch.images, training_tensor)
    expected = reference.probabilities(version, mode, training_tensor, batch_size=len(rows))
    # The same batch of 6 through the same kernels in the same mode: equal up to float noise (~1e-7), whatever
    # the mode; 1e-6 is the served rounding (5e-7) with room for that noise.
    torch.testing.assert_close(h.handler.inference(batch).probabilities, expected, atol=1e-6, rtol=0)
    for (status, body), probs in zip(h.run(rows, [{"X-TopK": "10"}] * len(rows)), expected, strict=True):
        assert status == 200
        served = torch.tensor([body[label] for label in spec.classes])
        torch.testing.assert_close(served, probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("version", SHIPPED, ids=lambda v: f"{v.model}-{v.version}")
def test_shipped_weights_classify_real_images_through_the_handler(harness, validation_split, version):
    """PNG-encoded validation images through every archive's handle() give the top-1 an independent reference
    computes in the mode the worker chose, agree with eager fp32 as closely as that mode promises, and reach the
    model card's accuracy."""
    spec = SPECS[version.model]
    val_images, val_labels = validation_split(version.model)
    val_images, val_labels = val_images[:1000], val_labels[:1000]
    h = harness(version_key(version.model, version.version))
    mode = h.handler.describe()["numerics"]["mode"]
    batch_size = 8  # server-side batches of 8, as model-config sets
    predictions = []
    for start in range(0, len(val_images), batch_size):
        chunk = val_images[start:start + batch_size].permute(0, 2, 3, 1).numpy()
        rows = [{"body": images.encode(p.squeeze(-1) if spec.channels == 1 else p)} for p in chunk]
        predictions += [spec.classes.index(next(iter(body))) for _, body in h.run(rows)]
    predictions = torch.tensor(predictions)
    normalized = spec.normalize(val_images)
    in_mode = reference.probabilities(version, mode, normalized, batch_size)
    assert unexplained_top1_differences(predictions, in_mode, mode) == []
    fp32 = reference.probabilities(version, "fp32", normalized, 250)
    if mode in ("fp32", "fp32-cl"):
        # The same arithmetic in another memory layout and batch: top-1 equal but for fp32 ties.
        assert unexplained_top1_differences(predictions, fp32, "fp32") == []
    else:
        # A worker serves a reduced-precision mode only when it agrees with fp32 on >= 99.5% of the archive's 400
        # reference images (models/numerics.py); on these 1,000 other images bf16 agreed on 99.8% (this host and
        # docs/kserve.md's H100 table); 99% leaves room for sampling (5 disagreements more than measured).
        assert (predictions == fp32.argmax(1)).float().mean().item() >= 0.99
    card = json.loads(version.weights.with_suffix(".json").read_text())
    plain = card["validation"].get("accuracy_without_tta", card["validation"]["accuracy"])
    accuracy = (predictions == val_labels).float().mean().item()
    # 1,000 of the 5,000 validation images: the sample's accuracy is within 4 points of the card's (>4 sigma).
    assert abs(accuracy - plain) < 0.04, (accuracy, plain)


def test_a_request_over_its_pixel_budget_is_refused_from_the_headers(harness):
    """The budget is the sum over the request's images, checked before any of them is decoded."""
    h = harness("cifar10", handler={"max_request_pixels": 3000})
    status, body = h.one({"body": {"data": [b64(images.encode(images.noise(40, 40, seed=i))) for i in range(2)]}})
    assert status == 413 and body["type"] == "RequestTooExpensive" and "3,200 pixels" in body["message"]
    status, _ = h.one({"body": {"data": [b64(images.encode(images.noise(40, 40)))]}})
    assert status == 200
    # A JPEG counts at the scale draft mode decodes it at (1/8 of each side here): 1600×1600 → 200×200 = 40,000.
    jpeg = images.encode(images.smooth(1600, 1600), "JPEG", quality=90)
    status, body = harness("cifar10", handler={"max_request_pixels": 40_000}).one({"body": jpeg})
    assert status == 200, body


def test_past_the_batch_budget_the_costliest_rows_answer_503_with_retry_after(harness):
    """Requests are decoded cheapest first, so the expensive one is refused and the small ones are served."""
    h = harness("cifar10", handler={"max_request_pixels": 2000, "max_batch_pixels": 2000})
    rows = [{"body": images.encode(images.noise(40, 40))},   # 1,600 pixels: decoded last, 400 + 1,024 + 1,600 > 2,000
            {"body": images.encode(images.noise(32, 32))},   # 1,024: decoded second
            {"body": images.encode(images.noise(20, 20))}]   # 400: decoded first
    results = h.run(rows)
    assert [status for status, _ in results] == [503, 200, 200]
    assert results[0][1]["type"] == "Busy" and "send it again" in results[0][1]["message"]
    assert h.context.get_response_headers(0).get("Retry-After") == "1"
    assert "Retry-After" not in h.context.get_response_headers(1)
    assert h.run(rows[:1])[0][0] == 200  # alone, the same request fits its batch


def test_rows_after_the_batch_deadline_answer_503_and_the_first_is_always_served(harness):
    """A 1 ms deadline: decoding the first (1-megapixel) request takes longer on any host (≥ 10 ns a pixel)."""
    h = harness("cifar10", handler={"batch_deadline_ms": 1})
    rows = [{"body": images.encode(images.smooth(side, side, seed=side))} for side in (1000, 1100, 1200)]
    results = h.run(rows)
    assert [status for status, _ in results] == [200, 503, 503]
    assert results[1][1]["type"] == "Busy" and "deadline" in results[1][1]["message"]
    assert h.context.get_response_headers(2).get("Retry-After") == "1"


def test_grpc_and_rest_requests_are_told_apart(harness):
    """Only a gRPC answer carries `ts_stream_next` (the frontend's gRPC stream needs it; on REST it would turn the
    answer into a chunked response that never ends). The harness frames both as the frontend does."""
    h = harness("cifar10")
    grpc_answer = h.one({"data": PNG}, route="grpc")
    assert h.context.get_response_headers(0).get("ts_stream_next") == "false"
    rest_answer = h.one({"body": PNG})
    assert "ts_stream_next" not in h.context.get_response_headers(0)
    assert grpc_answer == rest_answer


def test_explain_and_describe_are_decided_per_request(harness):
    """One request's headers never decide another's answer (TorchServe's base handler reads only the first)."""
    h = harness("cifar10")
    rows = [{"body": PNG}] * 4
    results = h.run(rows, routes=["explanations", "predictions", "describe", "predictions"])
    assert results[0][0] == 200 and len(results[0][1]["attributions"]) == 32  # the explanation, for that row only
    assert results[1][0] == results[3][0] == 200 and next(iter(results[1][1])) in CIFAR10.classes
    assert "attributions" not in results[1][1] and results[1][1] == results[3][1]
    assert results[2][0] == 200 and results[2][1]["labels"] == list(CIFAR10.classes)
    assert results[2][1]["limits"]["max_request_pixels"] > 0


KSERVE_SAMPLE = ROOT.parent / "shared" / "kserve" / "samples" / "v2_bytes_conv_mnist_v2_bytes.json"


def v2_tensor(pixels: np.ndarray, datatype: str = "UINT8") -> dict:
    return {"inputs": [{"name": "images", "datatype": datatype, "shape": list(pixels.shape),
                        "data": pixels.flatten().tolist()}]}


def test_kserve_v2_sample_request_works_against_mnist_as_it_is(harness):
    require(KSERVE_SAMPLE.is_file(), f"{KSERVE_SAMPLE} is absent: KServe's samples are only on CI and the "
                                     "project's machines")
    status, body = harness("mnist").one({"body": json.loads(KSERVE_SAMPLE.read_text())})
    assert status == 200, body
    assert body["model_name"] == "mnist" and body["model_version"] == "1.0" and body["id"]
    labels, probabilities = body["outputs"]
    assert labels["name"] == "labels" and labels["datatype"] == "BYTES" and labels["shape"] == [1, 3]
    assert probabilities["datatype"] == "FP32" and probabilities["shape"] == [1, 3]
    assert labels["data"][0] == "0"  # the sample's image is a handwritten zero (KServe's README prints another answer)
    assert probabilities["data"] == sorted(probabilities["data"], reverse=True)


def test_kserve_v2_bytes_and_pixel_tensors_answer_like_the_image(harness):
    h = harness("cifar10")
    pixels = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png = images.encode(pixels)
    _, expected = h.one({"body": png})
    requests_ = {
        "bytes": {"id": "r1", "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [b64(png)]}]},
        "uint8 NHWC": v2_tensor(pixels[None]),
        "uint8 NCHW": v2_tensor(pixels.transpose(2, 0, 1)[None]),
        "fp32 NCHW": v2_tensor(pixels.transpose(2, 0, 1)[None].astype(np.float32) / 255, "FP32"),
    }
    for name, request in requests_.items():
        status, body = h.one({"body": request})
        assert status == 200, (name, body)
        labels, probabilities = body["outputs"]
        answer = dict(zip(labels["data"], probabilities["data"], strict=True))
        # The float tensor is normalised from other float values than the image: an input-rounding step apart.
        assert same(answer, expected, mode_tolerance(h)), name
    status, body = h.one({"body": requests_["bytes"]})
    assert body["id"] == "r1" and body["model_name"] == "cifar10" and body["model_version"] == "1.0"
    two = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": -1, "data": [b64(png), b64(PNG)]}],
           "parameters": {"topk": 2}}
    status, body = h.one({"body": two})
    assert status == 200 and body["outputs"][0]["shape"] == [2, 2] and len(body["outputs"][1]["data"]) == 4


@pytest.mark.parametrize("request_, message", [
    ({"inputs": []}, "exactly one tensor"),
    ({"inputs": [{"datatype": "INT64", "shape": [1], "data": [1]}]}, "datatype is 'INT64'"),
    ({"inputs": [{"datatype": "BYTES", "shape": [2], "data": ["aGk="]}]}, "holds 2 elements but data has 1"),
    ({"inputs": [{"datatype": "UINT8", "shape": [1, 3, 28, 28], "data": [0] * 3 * 28 * 28}]}, "this model takes"),
    ({"inputs": [{"datatype": "FP32", "shape": [1, 32, 32, 3], "data": [2.0] * 3072}]}, "must lie in [0.0, 1.0]"),
    ({"inputs": [{"datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [300] * 3072}]}, "must lie in [0, 255]"),
    ({"inputs": [{"datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [1] * 30}]}, "holds 3072 elements"),
    ({"inputs": [{"datatype": "UINT8", "shape": [32, 32], "data": [1] * 1024}]}, "needs its shape"),
    ({"inputs": [{"datatype": "BYTES", "data": ["@@@"]}]}, "inputs[0].data[0]: invalid base64"),
    ({"instances": [{"b64": "@@@"}]}, "instances[0]: invalid base64"),
])
def test_kserve_errors_are_4xx_with_the_protocols_error_body(harness, request_, message):
    status, body = harness("cifar10").one({"body": request_})
    assert status == 400 and list(body) == ["error"] and message in body["error"], body


def test_torchserve_envelopes_are_pass_throughs_in_a_worker(harness):
    """TS_SERVICE_ENVELOPE=kserve|kservev2 makes TorchServe's loader wrap the handler in an envelope that reads
    only a batch's first request; with this archive loaded, its loader gets a pass-through instead."""
    from ts.model_loader import TsModelLoader

    harness("cifar10")

    def handle(data, context):
        return data

    for name in ("kserve", "kservev2"):
        envelope = TsModelLoader()._load_default_envelope(name)
        assert envelope(handle).handle is handle


def test_the_worker_uses_its_assigned_gpu_only_when_cuda_is_there(model_dirs):
    """TorchServe passes gpu_id when number_of_gpu > 0; without CUDA the same worker runs on the CPU."""
    from serving.inprocess import InProcessHandler

    h = InProcessHandler(model_dirs["mnist"], gpu=0)
    assert h.handler.device == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    status, body = h.one({"body": images.encode(images.digit())})
    assert status == 200 and len(body) == 3


def test_a_torchserve_the_handler_was_not_checked_against_is_named_in_the_log(caplog):
    """The envelope switch (at import: TorchServe's loader wraps `handle` before `initialize`) and the early
    answers rely on TorchServe's loader and message code as read in 0.9.0 and 0.12.0: another version is said."""
    from handlers import explaining, oip

    with caplog.at_level("WARNING"):
        oip.check_loader("0.12.0")
        assert explaining.answers_first("0.9.0") and caplog.records == []
        oip.check_loader("0.13.0")
        assert not explaining.answers_first("0.13.0")
    assert [r.getMessage().split(" is not one")[0] for r in caplog.records] == ["TorchServe 0.13.0"] * 2
