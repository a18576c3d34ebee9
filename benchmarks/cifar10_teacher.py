"""CIFAR-10 (JPEG, ImageFolder layout) through the `imagefolder` source, then one teacher.

Runs the real `prepare` and `train_teacher` entry points on a generated params file and prints
a Markdown table: prepare time, test accuracy, median seconds per epoch (with min-max), device.

    python -m benchmarks.cifar10_teacher --root ../shared/data/cifar10-jpeg/train.tar.gz \
        --arch resnet20 --epochs 10 --workdir /tmp/cifar-bench
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import yaml

from benchmarks._runner import REPO, machine, run_stage, write_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="directory or .tar.gz with train/<class>/*.jpg")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-per-class", type=int, default=None, help="subsample for a quicker run")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slimdeploy-cifar10-bench"))
    args = p.parse_args()

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(source="imagefolder", root=str(Path(args.root).resolve()), image_size=None,
                             channels=3, val_fraction=0.1, test_fraction=0.1, max_per_class=args.max_per_class)
    params["train"].update(device=args.device, batch_size=args.batch_size, augment="padcrop_flip",
                           crop_padding=4, progress=False)
    params["teachers"] = {"bench": {"arch": args.arch, "seed": 0, "epochs": args.epochs, "optimizer": {
        "lr": args.lr, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "schedule": "cosine",
        "warmup_epochs": 1}}}
    w = args.workdir
    pfile = write_params(w, params)
    prep_s = run_stage("prepare", "--out", str(w / "prep"), "--metrics", str(w / "prepare.json"), params=pfile)
    train_s = run_stage("train_teacher", "--name", "bench", "--data", str(w / "prep"), "--out", str(w / "bench.pt"),
                        "--metrics", str(w / "bench.json"), "--plots", str(w / "bench.csv"),
                        "--resume-dir", str(w / "resume"), params=pfile)
    prep = json.loads((w / "prepare.json").read_text())
    m = json.loads((w / "bench.json").read_text())
    dev = m["device"]
    print(f"\n## CIFAR-10 JPEG teacher ({date.today()}), machine: {machine()}")
    print(f"device: {dev['type']} {dev['name']}, torch {dev['torch']}")
    print(f"data: train/val/test = {prep['train_images']}/{prep['val_images']}/{prep['test_images']}, "
          f"prepare {prep_s:.1f} s")
    print("\n| arch | params | epochs | batch | val acc | test acc | s/epoch median (min-max) | stage wall s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {m['arch']} | {m['params']:,} | {m['epochs']} | {args.batch_size} | {m['val_acc']:.4f} | "
          f"{m['test_acc']:.4f} | {m['epoch_seconds_median']:.1f} ({m['epoch_seconds_min']:.1f}-"
          f"{m['epoch_seconds_max']:.1f}) | {train_s:.0f} |")


if __name__ == "__main__":
    main()
