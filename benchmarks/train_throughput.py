"""Training throughput of a CIFAR network through the pipeline's own training loop, against the
device's arithmetic limit.

    python -m benchmarks.train_throughput [--arch resnet56] [--images 50000] [--batch 128] [--epochs 4]

What it measures, on the device torch picks (CUDA when present):
- training FLOPs per image: one forward and backward of a batch under
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, 2 FLOPs per
  multiply-add), divided by the batch size;
- the device's matrix throughput: a square matmul (bf16 on CUDA, fp32 on CPU) timed with
  ``torch.utils.benchmark`` (median and interquartile range of ``blocked_autorange``);
- training images per second: ``pipeline.train.train_classifier`` on synthetic uint8 32x32 images
  held on the device (pad-crop + flip done there, as in the real stages), epoch time as the loop
  reports it (synchronised on CUDA), median over the epochs after the first, with the range.
  On CUDA it runs four variants in the same process: the default (bf16 autocast + channels_last,
  the training step replayed as a CUDA graph: ``train.cuda_graph``), the same step eager, bf16
  eager without channels_last, and fp32 eager; the ratios between them are the point.

Achieved FLOP/s = FLOPs per image x images per second; utilisation = achieved / matmul FLOP/s.
The data are random, so the accuracy is meaningless; only time is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._runner import machine
from models import build_model
from pipeline.config import OptimizerConfig, TrainConfig
from pipeline.data import PreparedData, Split
from pipeline.runtime import describe_device, resolve_device
from pipeline.train import train_classifier

CIFAR_MEAN, CIFAR_STD = [0.491, 0.482, 0.447], [0.247, 0.243, 0.262]


def training_flops_per_image(arch: str, batch: int, device: torch.device) -> tuple[float, str]:
    """(FLOPs per training image, how they were counted).

    Forward and backward are counted as run. Exception: FlopCounterMode in torch 2.13 counts the
    backward of a grouped convolution as if it were dense (measured: a depthwise 3x3 over 64
    channels at 32x32 counts 1.2 MFLOP forward and 76.7 MFLOP backward, where 2x forward is
    right), so networks with grouped convolutions are counted as 3x their forward FLOPs."""
    model = build_model(arch, num_classes=10, in_channels=3).to(device).train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    grouped = any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())
    with FlopCounterMode(display=False) as counter:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        forward = counter.get_total_flops()
        loss.backward()
    if grouped:
        return 3.0 * forward / batch, "3 x forward (grouped convolutions: torch miscounts their backward)"
    return counter.get_total_flops() / batch, "forward + backward as counted"


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile) TFLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = benchmark.Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
    m = t.blocked_autorange(min_run_time=2.0)
    flops = 2.0 * n**3
    times = sorted(m.times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return flops / m.median / 1e12, flops / q(0.75) / 1e12, flops / q(0.25) / 1e12


def synthetic_data(images: int, device_hint: str) -> PreparedData:
    g = torch.Generator().manual_seed(0)
    split = lambda n: Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),  # noqa: E731
                            torch.randint(0, 10, (n,), generator=g))
    meta = {"num_classes": 10, "channels": 3, "mean": CIFAR_MEAN, "std": CIFAR_STD, "source": device_hint}
    return PreparedData(split(images), split(512), split(512), meta)


def images_per_second(arch: str, data: PreparedData, batch: int, epochs: int, device: torch.device,
                      amp: bool, channels_last: bool, cuda_graph: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=3)
    cfg = TrainConfig(batch_size=batch, augment="padcrop_flip", amp=amp, channels_last=channels_last, progress=False,
                      cuda_graph=cuda_graph)
    result = train_classifier(model, data, cfg, OptimizerConfig(lr=0.05), epochs=epochs, seed=0, device=device)
    steady = [h["epoch_seconds"] for h in result.history[1:]] or [result.history[0]["epoch_seconds"]]
    n = len(data.train) // batch * batch
    rates = sorted(n / s for s in steady)
    return {"images_per_s": statistics.median(rates), "min": rates[0], "max": rates[-1],
            "epoch_seconds_median": statistics.median(steady), "epochs_timed": len(steady),
            "step_mode": result.step_mode, "final_train_loss": result.history[-1]["train_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet56")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=None, help="training images per epoch (default 50000 on CUDA, 2048 on CPU)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4, help="the first is warm-up and not timed")
    p.add_argument("--matmul", type=int, default=None, help="matmul size (default 8192 on CUDA, 2048 on CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    images = args.images or (50_000 if cuda else 2048)
    n = args.matmul or (8192 if cuda else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32

    flops, counted = training_flops_per_image(args.arch, args.batch, device)
    peak, peak_lo, peak_hi = matmul_tflops(device, n, dtype)
    data = synthetic_data(images, device.type)
    variants = [("bf16 autocast + channels_last, CUDA graph", True, True, True),
                ("bf16 autocast + channels_last, eager", True, True, False), ("bf16 autocast, NCHW, eager", True, False, False),
                ("fp32, NCHW, eager", False, False, False)] if cuda else [("fp32 (CPU)", False, False, False)]
    rows = []
    for label, amp, cl, graph in variants:
        r = images_per_second(args.arch, data, args.batch, args.epochs, device, amp, cl, graph)
        achieved = flops * r["images_per_s"] / 1e12
        rows.append({"variant": label, **r, "achieved_tflops": achieved, "utilisation": achieved / peak})

    dev = describe_device(device)
    print(f"## Training throughput, {args.arch}, batch {args.batch}, {images} synthetic 32x32 images per epoch "
          f"({date.today()})")
    print(f"device: {dev['name']} ({device.type}, torch {torch.__version__}); host: {machine()}")
    print(f"training FLOPs per image (FlopCounterMode, {counted}): {flops / 1e6:.1f} MFLOP")
    print(f"matmul {n}x{n} {str(dtype).removeprefix('torch.')}: {peak:.3f} TFLOP/s median "
          f"(IQR {peak_lo:.3f}-{peak_hi:.3f})\n")
    print("| variant | step | images/s median | range | s/epoch | achieved TFLOP/s | of matmul throughput | last loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['step_mode']} | {r['images_per_s']:.0f} | {r['min']:.0f}-{r['max']:.0f} | "
              f"{r['epoch_seconds_median']:.2f} | {r['achieved_tflops']:.3f} | {100 * r['utilisation']:.1f}% | "
              f"{r['final_train_loss']:.3f} |")
    if len(rows) > 1:
        base = rows[-1]["images_per_s"]
        print("\nspeed-up over fp32 NCHW eager (same run): " +
              ", ".join(f"{r['variant']} {r['images_per_s'] / base:.2f}x" for r in rows[:-1]))
        print(f"CUDA graph over the same step eager (same run): {rows[0]['images_per_s'] / rows[1]['images_per_s']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": str(date.today()), "device": dev, "host": machine(), "arch": args.arch, "batch": args.batch,
            "images": images, "train_flops_per_image": flops, "flops_counted": counted, "matmul": {"n": n, "dtype": str(dtype),
            "tflops_median": peak, "tflops_iqr": [peak_lo, peak_hi]}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
