"""Latency of one convolution (3x3, + BatchNorm + ReLU) against its output and input channels on
the target backend: the staircase the lookup table and the pruning step are built around.

    python -m benchmarks.latency_staircase [--backend onnxruntime] [--size 16] [--fixed 32] [--max 64]
"""

from __future__ import annotations

import argparse
from datetime import date

from benchmarks._runner import machine
from pipeline.latency import TimingProtocol, detect_step, make_backend, micro_model
from pipeline.latency.table import LayerSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=16, help="spatial size H = W")
    p.add_argument("--fixed", type=int, default=32, help="the other channel count, held fixed")
    p.add_argument("--max", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    be = make_backend(args.backend, device=args.device, batch_size=1, threads=args.threads, protocol=TimingProtocol())
    spec = LayerSpec("conv", "k", "a", "b", args.fixed, args.max, False, (3, 3), (1, 1), (1, 1), (1, 1), False,
                     args.size, args.size, True, "ReLU")
    shape = lambda c: (c, args.size, args.size)  # noqa: E731
    chans = range(1, args.max + 1)
    out = [t.ms * 1e3 for t in be.measure_many([micro_model(spec, args.fixed, c) for c in chans], shape(args.fixed))]
    inn = [t.ms * 1e3 for t in be.measure_many([micro_model(spec, c, args.fixed) for c in chans], [shape(c) for c in chans])]
    print(f"## Conv3x3+BN+ReLU at {args.size}x{args.size}, {args.backend} {args.device}, {args.threads} thread(s), "
          f"batch 1 ({date.today()}), machine: {machine()}")
    print(f"detected step (output channels): {detect_step([v / 1e3 for v in out])}\n")
    print("| channels | latency us, varying output (input fixed at %d) | latency us, varying input (output fixed at %d) |"
          % (args.fixed, args.fixed))
    print("|---|---|---|")
    for c in range(1, args.max + 1):
        print(f"| {c} | {out[c - 1]:.1f} | {inn[c - 1]:.1f} |")


if __name__ == "__main__":
    main()
