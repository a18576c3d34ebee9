"""Check a handoff bundle from the outside: write N test images of the prepared split as PNG files,
classify them with ``python -m pipeline.predict`` (a subprocess, as a deploy team would), and
compare with the labels and with the bundle's reported accuracy; also re-measure the latency the
manifest reports and check it against the budget.

    python -m benchmarks.handoff_predict --bundle artifacts/handoff --data artifacts/prepare -n 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._runner import REPO, machine


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/handoff")
    p.add_argument("--data", default="artifacts/prepare")
    p.add_argument("-n", type=int, default=20)
    args = p.parse_args()
    from pipeline.data import load_prepared
    from pipeline.deploy import engine_latency, verify_bundle
    from pipeline.latency import TimingProtocol
    from pipeline.latency.backends import wall_timed
    from pipeline.runtimes import ort_session

    data = load_prepared(REPO / args.data)
    manifest = verify_bundle(REPO / args.bundle)
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(args.n):
            img = data.test.x[i].numpy()
            pil = Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0))
            paths.append(Path(d) / f"test_{i:03d}.png")
            pil.save(paths[-1])
        out = subprocess.run([sys.executable, "-m", "pipeline.predict", "--bundle", str(REPO / args.bundle), "--json",
                              *map(str, paths)], cwd=REPO, capture_output=True, text=True, check=True).stdout
    results = [json.loads(line) for line in out.splitlines()]
    labels = data.test.y[: args.n].tolist()
    correct = sum(r["index"] == y for r, y in zip(results, labels))
    # the latency the manifest reports, measured again on the bundle's engine at its batch
    pre = manifest["preprocessing"]
    bs = manifest["latency"]["batch_size"]
    x = (data.test.x[:bs].numpy().astype(np.float32) * pre["scale"] - np.asarray(pre["mean"], np.float32).reshape(1, -1, 1, 1)) \
        / np.asarray(pre["std"], np.float32).reshape(1, -1, 1, 1)
    sess = ort_session(REPO / args.bundle / manifest["model"]["onnx"], "cpu", threads=manifest["latency"]["threads"])
    feed = {manifest["input"]["name"]: x}
    lat = engine_latency(wall_timed(lambda: sess.run(None, feed)), TimingProtocol(passes=40, min_span_s=2.0))
    budget = manifest["budget"]["budget_ms"]
    print(f"machine: {machine()}")
    print(f"predict on {args.n} test images: {correct}/{args.n} correct ({correct / args.n:.2%}); bundle reports "
          f"{manifest['accuracy']['test_acc_engine']:.2%} on all {manifest['accuracy']['test_images']}")
    print(f"bundle latency (manifest): {manifest['latency']['ms']:.4f} ms; re-measured (model.onnx, ONNX Runtime "
          f"full optimisation): {lat['ms']:.4f} ms (p50 of all calls {lat['p50_ms']:.4f}, p90 {lat['p90_ms']:.4f}, "
          f"p99 {lat['p99_ms']:.4f}); budget {budget:.4f} ms -> {'within' if lat['ms'] <= budget else 'OVER'} "
          f"({lat['ms'] / budget:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
