"""Slimming at about 50% of channels kept: parameters, FLOPs and ONNX Runtime CPU latency before
and after, for our registry models and torchvision classifiers.

    python -m benchmarks.slim_models [--size 224] [--threads 1] [--rounds 3]

Masks keep the 50% largest-L1 filters of every channel group (rounded to multiples of 8).
Latency: ONNX Runtime CPU provider, batch 1, torch.utils.benchmark blocked_autorange; before and
after are measured alternately ``--rounds`` times and the medians reported with their range.
"""

from __future__ import annotations

import argparse
import statistics
from datetime import date

import torch

from benchmarks._runner import machine
from models import build_model
from pipeline.flops import count_flops, count_params
from pipeline.latency import TimingProtocol, make_backend
from pipeline.slim import SlimError, magnitude_masks, slim

MODELS = [
    ("resnet56", 32), ("mobilenetv2", 32),
    ("torchvision:resnet18", None), ("torchvision:resnet50", None), ("torchvision:mobilenet_v2", None),
    ("torchvision:mobilenet_v3_small", None), ("torchvision:efficientnet_b0", None),
    ("torchvision:regnet_x_400mf", None), ("torchvision:densenet121", None),
    ("torchvision:shufflenet_v2_x1_0", None),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="input size of the torchvision models")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window-ms", type=float, default=20.0, help="timing window (ms); 10 windows per model")
    p.add_argument("--only", nargs="*", help="subset of model names")
    args = p.parse_args()
    backend = make_backend("onnxruntime", batch_size=1, threads=args.threads,
                           protocol=TimingProtocol(window_s=args.window_ms / 1e3))
    print(f"## Slimming at ~50% channels ({date.today()}), machine: {machine()}, onnxruntime CPU, "
          f"{args.threads} thread(s), batch 1\n")
    print("| model | input | params before -> after | GFLOPs before -> after | latency ms before (range) | "
          "latency ms after (range) | FLOPs reduction | latency reduction | latency/FLOPs reduction | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch, size in MODELS:
        if args.only and arch not in args.only:
            continue
        size = size or args.size
        torch.manual_seed(0)
        model = build_model(arch, num_classes=10 if size == 32 else 1000, in_channels=3).eval()
        shape = (3, size, size)
        example = torch.zeros(1, *shape)
        try:
            masks = magnitude_masks(model, example, 0.5, multiple=8)
            res = slim(model, example, masks, check_inputs=torch.randn(2, *shape))
        except SlimError as err:
            print(f"| {arch} | {size} | not slimmable: {err} | | | | | | | |")
            continue
        before, after = [], []
        for _ in range(args.rounds):
            b, a = backend.measure_many([model, res.model], shape)  # interleaved: the same conditions
            before.append(b.ms)
            after.append(a.ms)
        fb, fa = count_flops(model, shape), count_flops(res.model, shape)
        lb, la = statistics.median(before), statistics.median(after)
        fr, lr = 1 - fa / fb, 1 - la / lb
        print(f"| {arch} | {size} | {count_params(model) / 1e6:.2f}M -> {count_params(res.model) / 1e6:.2f}M | "
              f"{fb / 1e9:.3f} -> {fa / 1e9:.3f} | {lb:.2f} ({min(before):.2f}-{max(before):.2f}) | "
              f"{la:.2f} ({min(after):.2f}-{max(after):.2f}) | {fr:.1%} | {lr:.1%} | {lr / fr:.2f} | "
              f"{res.max_abs_diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
