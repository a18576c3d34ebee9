"""CIFAR-10 JPEG, reduced schedule for a CPU: teachers, ensemble, student search, then the
distillation/architecture ablation, all through the real stage entry points.

    python -m benchmarks.cifar10_student --root ../shared/data/cifar10-jpeg/train.tar.gz \
        --max-per-class 300 --teacher-epochs 10 --search-epochs 5 --student-epochs 10

Prints the teachers' and ensemble's metrics and the search result; the ablation table is printed
by benchmarks.oracle_ablation, run on the same work directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks._runner import REPO, machine, run_stage, write_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--max-per-class", type=int, default=300)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--search-epochs", type=int, default=5)
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slimdeploy-cifar10-student"))
    args = p.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(source="imagefolder", root=str(Path(args.root).resolve()), image_size=None, channels=3,
                             max_per_class=args.max_per_class)
    params["train"].update(batch_size=64, augment="padcrop_flip", progress=False)
    opt = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 1}
    params["teachers"] = {
        "r20a": {"arch": "resnet20", "seed": 0, "epochs": args.teacher_epochs, "optimizer": opt},
        "r20b": {"arch": "resnet20", "seed": 1, "epochs": args.teacher_epochs, "optimizer": opt},
        "mbv2": {"arch": "mobilenetv2", "arch_config": {"width_mult": 0.5}, "seed": 2,
                 "epochs": args.teacher_epochs, "optimizer": opt},
    }
    params["search"].update(epochs=args.search_epochs, progress=False)
    params["student"].update(epochs=args.student_epochs)
    w = args.workdir
    pf = write_params(w, params)
    run_stage("prepare", "--out", str(w / "prep"), "--metrics", str(w / "m" / "prepare.json"), params=pf)
    for name in params["teachers"]:
        run_stage("train_teacher", "--name", name, "--data", str(w / "prep"), "--out", str(w / "t" / f"{name}.pt"),
                  "--metrics", str(w / "m" / f"{name}.json"), "--plots", str(w / "p" / f"{name}.csv"),
                  "--resume-dir", str(w / "resume"), params=pf)
    run_stage("ensemble", "--data", str(w / "prep"), "--teachers", str(w / "t"), "--metrics", str(w / "m" / "ensemble.json"),
              "--plots-dir", str(w / "p" / "ensemble"), params=pf)
    run_stage("search", "--data", str(w / "prep"), "--teachers", str(w / "t"), "--out", str(w / "arch.json"),
              "--metrics", str(w / "m" / "search.json"), "--plots", str(w / "p" / "search.csv"), params=pf)
    prep = json.loads((w / "m" / "prepare.json").read_text())
    ens = json.loads((w / "m" / "ensemble.json").read_text())
    srch = json.loads((w / "m" / "search.json").read_text())
    print(f"\n## CIFAR-10 JPEG, reduced ({machine()})")
    print(f"data: train/val/test = {prep['train_images']}/{prep['val_images']}/{prep['test_images']} "
          f"({args.max_per_class} per class pooled)")
    for name in params["teachers"]:
        m = json.loads((w / "m" / f"{name}.json").read_text())
        print(f"teacher {name} ({m['arch']}, {m['params']:,} params): test {m['test_acc']:.4f}, "
              f"{m['epoch_seconds_median']:.1f} s/epoch")
    print(f"ensemble {ens['ensemble_acc']:.4f}, oracle {ens['oracle_acc']:.4f}, all right {ens['all_right']:.4f}, "
          f"none right {ens['none_right']:.4f}")
    print(f"searched {srch['arch_config']}: {srch['params']:,} params "
          f"({srch['params_ratio_of_largest_teacher']:.1%} of the largest teacher)", flush=True)
    subprocess.run([sys.executable, "-m", "benchmarks.oracle_ablation", "--params", str(pf), "--data", str(w / "prep"),
                    "--teachers", str(w / "t"), "--arch", str(w / "arch.json"), "--seeds", *map(str, args.seeds)],
                   cwd=REPO, check=True)


if __name__ == "__main__":
    main()
