"""How far channel pruning can go at a given channel step: the smallest network against the full one.

    python -m benchmarks.prune_floor [--steps 16 8] [--size 32] [--threads 1]

For CIFAR ResNets of several depths and widths (32x32 inputs), every stage, stem and block width
is cut to the step (or kept when already narrower), which is what the prune stage's smallest
allowed network looks like when the step is larger than ``min_fraction`` x width; both networks
are measured on ONNX Runtime CPU at batch 1 (``torch.utils.benchmark`` blocked_autorange,
median). A budget below floor / full cannot be met at that step: this decides the channel step
of the CIFAR-10 presets.
"""

from __future__ import annotations

import argparse
from datetime import date

from benchmarks._runner import machine
from models import build_model
from pipeline.latency import TimingProtocol, make_backend

NETWORKS = {
    "blocks 9,8,7 widths 16/32/47": ([9, 8, 7], [16, 32, 47]),
    "blocks 9,9,9 widths 11/22/45": ([9, 9, 9], [11, 22, 45]),
    "blocks 5,5,5 widths 16/32/64 (ResNet-32)": ([5, 5, 5], [16, 32, 64]),
    "blocks 4,4,4 widths 16/24/48": ([4, 4, 4], [16, 24, 48]),
    "blocks 3,3,3 widths 16/32/64 (ResNet-20)": ([3, 3, 3], [16, 32, 64]),
}


def config(blocks: list[int], widths: list[int], cap: int | None = None) -> dict:
    w = [min(cap, x) if cap else x for x in widths]
    return {"blocks": blocks, "stage_widths": w, "stem_width": w[0], "mid_widths": [[x] * n for x, n in zip(w, blocks)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[16, 8])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window-ms", type=float, default=10.0, help="timing window (ms); 10 windows per model")
    args = p.parse_args()
    be = make_backend("onnxruntime", device="cpu", batch_size=1, threads=args.threads,
                      protocol=TimingProtocol(window_s=args.window_ms / 1e3, min_span_s=1.0))
    shape = (3, args.size, args.size)

    def ms(cfg: dict) -> float:
        return be.measure(build_model("cifar_resnet", num_classes=10, in_channels=3, **cfg).eval(), shape).ms

    print(f"## Smallest network against the full one, ONNX Runtime CPU, {args.threads} thread(s), batch 1, "
          f"{args.size}x{args.size} ({date.today()}), machine: {machine()}\n")
    print("| network | full ms | " + " | ".join(f"all at {s}: ms | floor / full" for s in args.steps) + " |")
    print("|---|---|" + "---|---|" * len(args.steps))
    for name, (blocks, widths) in NETWORKS.items():
        full = ms(config(blocks, widths))
        cells = []
        for s in args.steps:
            f = ms(config(blocks, widths, s))
            cells.append(f"{f:.3f} | {f / full:.3f}")
        print(f"| {name} | {full:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
