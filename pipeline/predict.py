"""Classify images with a handoff bundle: verify every file's sha256 against the manifest, apply
the manifest's preprocessing, run the ONNX model with ONNX Runtime, print class and probability.

    python -m pipeline.predict --bundle artifacts/handoff IMAGE [IMAGE ...] [--json]

Exit status 2 with a message naming the file when the bundle is incomplete or altered, or an
image cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DataError, SlimdeployError


def preprocess(paths: list[Path], pre: dict[str, Any]) -> np.ndarray:
    """Images -> float32 NCHW exactly as the training data was prepared (``pipeline.data``)."""
    from pipeline.data import _to_chw

    h, w = pre["resize"]
    if h != w:
        raise DataError(f"manifest resize {pre['resize']} is not square; this predictor resizes to squares")
    out = []
    for p in paths:
        try:
            with Image.open(p) as img:
                out.append(_to_chw(img, pre["channels"], h))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot read image {p}: {err}") from None
    x = np.stack(out).astype(np.float32) * pre["scale"]
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


def predict(bundle: str | Path, images: list[str | Path]) -> list[dict[str, Any]]:
    """[{image, class, index, probability}] for each image; the bundle is verified first."""
    from pipeline.deploy import ort_session, verify_bundle

    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    x = preprocess([Path(i) for i in images], manifest["preprocessing"])
    sess = ort_session(bundle / manifest["model"]["onnx"], "cpu", threads=1)
    logits = sess.run(None, {manifest["input"]["name"]: x})[0].astype(np.float64)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    classes = manifest["classes"]
    return [{"image": str(i), "class": classes[int(k)], "index": int(k), "probability": float(pr[k])}
            for i, k, pr in zip(images, prob.argmax(1), prob)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="handoff bundle directory (with manifest.json)")
    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    try:
        results = predict(args.bundle, args.images)
    except SlimdeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r) if args.json else f"{r['image']}\t{r['class']}\t{r['probability']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
