"""Classify images with a handoff bundle: check the manifest against its schema, verify every file's
sha256, decode and preprocess each image as the training data was, run the ONNX model with ONNX
Runtime, print class and probability.

    python -m pipeline.predict --bundle artifacts/handoff IMAGE [IMAGE ...] [--json] [--max-image-pixels N]

Images are decoded by the rule the manifest states (``preprocessing.decode``, ``pipeline.images``):
16-bit and float images are scaled to 8 bits, not clipped. Images with more pixels than the
bundle's ``preprocessing.max_image_pixels`` (default Pillow's limit, 89,478,485) are refused
before they are decoded; ``--max-image-pixels`` raises it for genuine large images.

Exit status 2 with a message naming the field or the file when the manifest is malformed, the
bundle is incomplete or altered, or an image cannot be read (and why: not an image, truncated,
too large); 141, silently, when the reader of the output goes away (``| head -1``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import DataError, SlimdeployError
from pipeline.images import ImageError, decode_image

if TYPE_CHECKING:  # pipeline.deploy imports torch: imported where it is used
    from pipeline.deploy import Preprocessing


def preprocess(paths: list[Path], pre: Preprocessing, max_pixels: int | None = None) -> np.ndarray:
    """Images -> float32 NCHW exactly as the training data was prepared: decoded by
    ``pipeline.images`` (``pre.decode``), resized (with ``pre.shorter_side``: shorter side resized,
    then centre-cropped, as ``pipeline.streaming.eval_view``), scaled and normalised by ``pre``.
    ``max_pixels``: the decoding limit (default: the bundle's ``pre.max_image_pixels``)."""
    h, w = pre.resize
    if h != w:
        raise DataError(f"manifest preprocessing.resize {pre.resize} is not square; this predictor resizes to squares")
    limit = pre.max_image_pixels if max_pixels is None else max_pixels
    crop = None
    if pre.shorter_side is not None:  # the training data's evaluation view, the same function
        import torch

        from pipeline.streaming import eval_view

        def crop(a: np.ndarray) -> np.ndarray:
            return eval_view(torch.tensor(a), pre.shorter_side, h).numpy()
    out = []
    for p in paths:
        try:
            img = decode_image(p, pre.channels, None if crop else h, max_pixels=limit, name=str(p),
                               limit_hint="--max-image-pixels")
        except ImageError as err:
            raise DataError(f"cannot read image {err}") from None
        out.append(crop(img) if crop else img)
    x = np.stack(out).astype(np.float32) * np.float32(pre.scale)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


def _onnx_to_run(spec: Any) -> str:
    """The bundle's INT8 engine when it is an ONNX model (what was measured and verified), else the
    fp32 ``model.onnx``."""
    engine = spec.engine
    if engine.get("precision") == "int8" and str(engine.get("file", "")).endswith(".onnx"):
        return str(engine["file"])
    return spec.model.onnx


def predict(bundle: str | Path, images: list[str | Path], max_pixels: int | None = None) -> list[dict[str, Any]]:
    """[{image, class, index, probability}] for each image; the bundle is verified first.
    ``max_pixels``: overrides the bundle's image size limit."""
    from pipeline.deploy import check_manifest, verify_bundle
    from pipeline.runtimes import ort_session

    bundle = Path(bundle)
    spec = check_manifest(verify_bundle(bundle))
    x = preprocess([Path(i) for i in images], spec.preprocessing, max_pixels)
    sess = ort_session(bundle / _onnx_to_run(spec), "cpu", threads=1)
    logits = sess.run(None, {spec.input.name: x})[0].astype(np.float64)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    return [{"image": str(i), "class": spec.classes[int(k)], "index": int(k), "probability": float(pr[k])}
            for i, k, pr in zip(images, prob.argmax(1), prob)]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="handoff bundle directory (with manifest.json)")
    p.add_argument("images", nargs="+", help="image files (any format and mode Pillow reads)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--max-image-pixels", type=_positive, default=None,
                   help="refuse images with more pixels (width x height) than this; default: the bundle's "
                        "preprocessing.max_image_pixels")
    args = p.parse_args(argv)
    try:
        results = predict(args.bundle, args.images, args.max_image_pixels)
    except SlimdeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r) if args.json else f"{r['image']}\t{r['class']}\t{r['probability']:.4f}")
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_main

    sys.exit(run_main(main))
