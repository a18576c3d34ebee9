"""How far channel pruning can go at a given channel step: the smallest network against the full one.

    python -m benchmarks.prune_floor [--steps 16 8] [--size 32] [--threads 1] [--student ARCH_JSON --student-size 16]

For CIFAR ResNets of several depths and widths (32x32 inputs), every stage, stem and block width
is cut to the step (or kept when already narrower), which is what the prune stage's smallest
allowed network looks like when the step is larger than ``min_fraction`` x width; both networks
are measured on ONNX Runtime CPU at batch 1 (``torch.utils.benchmark`` blocked_autorange,
median). A budget below floor / full cannot be met at that step: this decides the channel step
of the CIFAR-10 presets. With depth pruning (``prune.depth``, the default) the floor also removes
every removable residual block (identity shortcut); both floors are reported. ``--student`` adds
a searched student (``artifacts/search/arch.json``) at its own input size.
"""

from __future__ import annotations

import argparse
import json
from datetime import date

import torch

from benchmarks._runner import machine
from models import build_model
from pipeline.blocks import block_masks, residual_blocks
from pipeline.latency import TimingProtocol, make_backend
from pipeline.slim import prune_structure

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
    p.add_argument("--student", help="arch.json of a searched student (search stage) to add")
    p.add_argument("--student-size", type=int, default=16, help="the student's input size")
    p.add_argument("--student-channels", type=int, default=1, help="the student's input channels")
    args = p.parse_args()
    be = make_backend("onnxruntime", device="cpu", batch_size=1, threads=args.threads,
                      protocol=TimingProtocol(window_s=args.window_ms / 1e3, min_span_s=1.0))

    def ms(cfg: dict, shape: tuple[int, int, int], depth: bool = False) -> float:
        net = build_model("cifar_resnet", num_classes=10, in_channels=shape[0], **cfg).eval()
        if depth:  # every removable block removed as well
            example = torch.zeros(1, *shape)
            net = prune_structure(net, example, block_masks(net, list(residual_blocks(net))))
        return be.measure(net, shape).ms

    networks = {name: (config(blocks, widths), blocks, widths, (3, args.size, args.size))
                for name, (blocks, widths) in NETWORKS.items()}
    if args.student:
        arch = json.loads(open(args.student).read())["arch_config"]
        w = arch["stage_widths"]
        networks[f"searched student {arch['blocks']} {w} ({args.student_size}x{args.student_size})"] = (
            arch, arch["blocks"], w, (args.student_channels, args.student_size, args.student_size))
    print(f"## Smallest network against the full one, ONNX Runtime CPU, {args.threads} thread(s), batch 1, "
          f"{args.size}x{args.size} unless stated ({date.today()}), machine: {machine()}\n")
    print("| network | full ms | " + " | ".join(f"widths at {s}: floor / full | + blocks removed: floor / full"
                                               for s in args.steps) + " |")
    print("|---|---|" + "---|---|" * len(args.steps))
    for name, (cfg, blocks, widths, shape) in networks.items():
        full = ms(cfg, shape)
        cells = []
        for s in args.steps:
            capped = {**config(blocks, widths, s), "mid_widths": [[min(s, x) for x in m] for m in cfg["mid_widths"]]}
            cells.append(f"{ms(capped, shape) / full:.3f} | {ms(capped, shape, depth=True) / full:.3f}")
        print(f"| {name} | {full:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
