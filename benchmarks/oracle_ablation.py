"""Ablation of the student's distillation loss and architecture, on the pipeline's prepared data
and trained teachers (run `dvc repro search` first).

Same architecture (the searched arch.json), same epochs and optimiser, 3 seeds each:
oracle KD vs ensemble KD vs no distillation; and the searched architecture vs a uniformly scaled
CIFAR ResNet (same blocks as the family's largest member, all widths scaled) with the same
parameter count, both trained with oracle KD.

    python -m benchmarks.oracle_ablation [--seeds 0 1 2] [--epochs 15]
"""

from __future__ import annotations

import argparse
import statistics
from datetime import date
from pathlib import Path

import torch
import yaml

from benchmarks._runner import REPO, machine
from models import build_model
from pipeline.checkpoint import load_teachers
from pipeline.config import OptimizerConfig, TrainConfig, parse_teachers
from pipeline.data import load_prepared
from pipeline.distill import TeacherEnsemble, kd_criterion
from pipeline.flops import count_params
from pipeline.io import read_json
from pipeline.train import predict_logits, train_classifier


def uniform_like(arch: dict, target: int, num_classes: int, channels: int, blocks: list[int], widths: list[int]) -> dict:
    """cifar_resnet with ``blocks`` and ``widths`` scaled by one factor to ~``target`` params."""
    lo, hi = 0.05, 1.0
    cfg = {}
    for _ in range(40):
        mid = (lo + hi) / 2
        cfg = {"blocks": blocks, "stage_widths": [max(1, round(w * mid)) for w in widths]}
        n = count_params(build_model("cifar_resnet", num_classes=num_classes, in_channels=channels, **cfg))
        lo, hi = (mid, hi) if n < target else (lo, mid)
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="default: student.epochs from params.yaml")
    p.add_argument("--data", default=str(REPO / "artifacts/prepare"))
    p.add_argument("--teachers", default=str(REPO / "artifacts/teachers"))
    p.add_argument("--arch", default=str(REPO / "artifacts/search/arch.json"))
    p.add_argument("--params", default=str(REPO / "params.yaml"), help="train/student/distill/teachers settings")
    args = p.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    train_cfg = TrainConfig.model_validate({**params["train"], "progress": False})
    opt = OptimizerConfig.model_validate(params["student"]["optimizer"])
    epochs = args.epochs or params["student"]["epochs"]
    kd = params["distill"]
    data = load_prepared(args.data)
    names = list(parse_teachers(params))
    teachers = TeacherEnsemble(list(load_teachers(args.teachers, names, data.meta).values()))
    searched = read_json(Path(args.arch))
    n_cls, ch = data.num_classes, data.channels
    fam = searched["arch_config"]
    uni = uniform_like(fam, searched["params"], n_cls, ch, searched["family"]["blocks"],
                       searched["family"]["stage_widths"])
    mean, std = torch.tensor(data.meta["mean"]), torch.tensor(data.meta["std"])
    cpu = torch.device("cpu")

    def run(arch: dict, mode: str, seed: int) -> float:
        torch.manual_seed(seed)
        model = build_model("cifar_resnet", num_classes=n_cls, in_channels=ch, **arch)
        crit = kd_criterion(teachers, kd["temperature"], kd["alpha"], mode, kd["average"])
        res = train_classifier(model, data, train_cfg, opt, epochs=epochs, seed=seed, device=cpu, criterion=crit)
        model.load_state_dict(res.best_state)
        return (predict_logits(model, data.test, mean, std, cpu).argmax(1) == data.test.y).double().mean().item()

    rows = []
    for label, arch, mode in [("searched", fam, "oracle"), ("searched", fam, "ensemble"), ("searched", fam, "none"),
                              ("uniform", uni, "oracle")]:
        accs = [run(arch, mode, s) for s in args.seeds]
        n = count_params(build_model("cifar_resnet", num_classes=n_cls, in_channels=ch, **arch))
        rows.append((label, mode, n, accs))
        print(f"{label} {mode}: {accs}", flush=True)
    print(f"\n## Student ablation ({date.today()}), machine: {machine()}, device cpu, {epochs} epochs, "
          f"seeds {args.seeds}, test split of {len(data.test)} images")
    print(f"searched arch: {fam}\nuniform arch: {uni}\n")
    print("| architecture | distillation | params | test acc mean | std | per seed |")
    print("|---|---|---|---|---|---|")
    for label, mode, n, accs in rows:
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {label} | {mode} | {n:,} | {100 * statistics.mean(accs):.2f}% | {100 * sd:.2f} | "
              f"{', '.join(f'{100 * a:.2f}' for a in accs)} |")


if __name__ == "__main__":
    main()
