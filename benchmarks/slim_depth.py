"""Slimming with residual blocks removed: equivalence with the masked network, and what removing
blocks buys in measured latency on top of channel slimming.

    python -m benchmarks.slim_depth [--student artifacts/search/arch.json] [--threads 1]

For ResNet-20, ResNet-56, MobileNetV2 (32x32 inputs) and a searched student (16x16, 1 channel,
as the default pipeline's; ``--student`` reads its arch.json, else a fixed example), BatchNorm
statistics and affine parameters are randomised (a fresh network's zero-initialised last
BatchNorm would make every block an identity already and the check trivial). Then: channel
masks keeping the 50% largest-L1 filters of every group (multiples of 8), and additionally every
other removable block removed. Max abs difference slimmed vs masked on 64 random inputs; ONNX
Runtime CPU latency at batch 1 of the three networks measured together (interleaved windows).
"""

from __future__ import annotations

import argparse
import json
from datetime import date

import torch

from benchmarks._runner import machine
from models import build_model
from pipeline.blocks import block_masks, residual_blocks
from pipeline.flops import count_params
from pipeline.latency import TimingProtocol, make_backend
from pipeline.slim import magnitude_masks, slim
from tests.conftest import randomise_bn

STUDENT = {"blocks": [1, 3, 2], "stage_widths": [16, 29, 51], "stem_width": 16,
           "mid_widths": [[14], [26, 29, 32], [58, 51]]}



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", help="arch.json of a searched student")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window-ms", type=float, default=10.0)
    args = p.parse_args()
    student = json.loads(open(args.student).read())["arch_config"] if args.student else STUDENT
    nets = [("resnet20", {}, (3, 32, 32)), ("resnet56", {}, (3, 32, 32)), ("mobilenetv2", {"width_mult": 0.5}, (3, 32, 32)),
            ("cifar_resnet", student, (1, 16, 16))]
    be = make_backend("onnxruntime", device="cpu", batch_size=1, threads=args.threads,
                      protocol=TimingProtocol(window_s=args.window_ms / 1e3, min_span_s=1.0))
    print(f"## Slimming with blocks removed ({date.today()}), machine: {machine()}, onnxruntime CPU, "
          f"{args.threads} thread(s), batch 1\n")
    print("| network | input | blocks removed | params full -> channels -> + blocks | latency ms full | channels | "
          "+ blocks | max abs diff (channels + blocks) |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, cfg, shape in nets:
        torch.manual_seed(0)
        model = randomise_bn(build_model(arch, num_classes=10, in_channels=shape[0], **cfg))
        example = torch.zeros(1, *shape)
        channels = magnitude_masks(model, example, 0.5, multiple=8)
        blocks = sorted(residual_blocks(model))[::2]
        x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(1))
        only_channels = slim(model, example, channels, check_inputs=x)
        both = slim(model, example, {**channels, **block_masks(model, blocks)}, check_inputs=x)
        t_full, t_ch, t_both = be.measure_many([model, only_channels.model, both.model], shape)
        name = "searched student" if arch == "cifar_resnet" else arch
        print(f"| {name} | {'x'.join(map(str, shape))} | {len(blocks)} of {len(residual_blocks(model))} | "
              f"{count_params(model):,} -> {count_params(only_channels.model):,} -> {count_params(both.model):,} | "
              f"{t_full.ms:.4f} | {t_ch.ms:.4f} | {t_both.ms:.4f} | {both.max_abs_diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
