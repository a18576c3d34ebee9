"""The README's "Your own model and images", followed as written on data the tests do not use.

    python -m benchmarks.your_model --out benchmarks/results/your_model [--per-class 150 --test-per-class 50 --size 96]

1. An image folder the way a user has one: CIFAR-10 JPEGs (../shared/data/cifar10-jpeg) laid out
   as ``data/mine/train/<class>/*.jpg`` and ``data/mine/test/<class>/*.jpg``, resized to ``--size``
   pixels (disjoint images in train and test).
2. A network trained *outside the pipeline*: torchvision's ``resnet18`` (10 classes, random
   initialisation), trained here with plain torch on ``train/`` only (SGD, cosine, flip
   augmentation, inputs normalised with the train images' own mean and std, as the pipeline
   normalises), saved as a plain ``state_dict`` in ``weights/mine.pt``.
3. A fresh clone of the committed HEAD with the README's params (prepare an imagefolder read from
   disk, ``storage: files``, fine-tuned with ``random_resized_crop``,
   ``teachers: {mine: {arch: torchvision:resnet18, weights: weights/mine.pt, epochs: 0}}``,
   ``compress.model: artifacts/teachers/mine``, ``distill.mode: ensemble``, budget 0.5) and
   ``make run``, logged per stage.
4. Checks: which stages ran (search and the student must not), the bundle's ``pipeline.predict``
   against the slimmed PyTorch model on every test image (top-1 agreement), the engine's measured
   latency against the budget, and the input model's accuracy beside the compressed one's.

Writes ``result.json``, ``table.md`` and the run's log into ``--out``. Needs the CIFAR-10 archive;
exits 2 without it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from benchmarks._runner import REPO, machine, write_results
from benchmarks.cifar10_pipeline import run_logged, stage_times_from_log

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "train.tar.gz"


def make_folder(root: Path, per_class: int, test_per_class: int, size: int, seed: int) -> list[str]:
    """train/ and test/ class folders of disjoint, resized CIFAR-10 JPEGs; returns the classes."""
    from PIL import Image

    with tarfile.open(ARCHIVE) as tar:  # names first, then one sequential pass (a .tar.gz does not seek)
        names = sorted(m.name for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg"))
    by_class: dict[str, list[str]] = {}
    for n in names:
        by_class.setdefault(n.split("/")[1], []).append(n)
    rng = random.Random(seed)
    chosen: dict[str, str] = {}
    for files in by_class.values():
        rng.shuffle(files)
        chosen.update({n: "train" for n in files[:per_class]})
        chosen.update({n: "test" for n in files[per_class:per_class + test_per_class]})
    with tarfile.open(ARCHIVE) as tar:
        for m in tar:
            split = chosen.get(m.name)
            if split is None:
                continue
            dest = root / split / m.name.split("/")[1] / Path(m.name).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
            img.resize((size, size), Image.BICUBIC).save(dest, quality=95)
    return sorted(by_class)


def train_outside(root: Path, classes: list[str], epochs: int, seed: int, out: Path) -> dict[str, Any]:
    """torchvision resnet18 trained with plain torch on train/ (what a user brings); test accuracy on test/."""
    import torch
    from torch import nn

    from models.tvcompat import import_torchvision

    torchvision = import_torchvision()  # this machine's torchvision wheel is a CUDA build (models/tvcompat.py)
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    train = torchvision.datasets.ImageFolder(root / "train", transform=to_tensor)
    test = torchvision.datasets.ImageFolder(root / "test", transform=to_tensor)
    assert train.classes == classes == test.classes
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor(train.targets)
    xt = torch.stack([test[i][0] for i in range(len(test))])
    yt = torch.tensor(test.targets)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    net = torchvision.models.resnet18(num_classes=len(classes))
    steps = epochs * math.ceil(len(y) / 64)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(y)).split(64):
            xb = (x[idx] - mean) / std
            flip = torch.rand(len(idx)) < 0.5
            xb[flip] = xb[flip].flip(-1)
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net((xt - mean) / std).argmax(1) == yt).float().mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    return {"arch": "torchvision resnet18", "epochs": epochs, "train_images": len(y), "test_images": len(yt),
            "test_acc_outside": acc, "train_seconds": time.perf_counter() - t0}


def readme_params(repo: Path, size: int, budget: float) -> dict[str, Any]:
    """params.yaml with the README's keys, as a user would edit it."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"].update(source="imagefolder", root="data/mine", image_size=size, storage="files")
    params["train"]["augment"] = "random_resized_crop"
    params["teachers"] = {"mine": {"arch": "torchvision:resnet18", "weights": "weights/mine.pt", "epochs": 0}}
    params["compress"] = {"model": "artifacts/teachers/mine"}
    params["distill"]["mode"] = "ensemble"
    params["prune"]["latency_budget"] = budget
    params["train"]["progress"] = False
    return params


def agreement(repo: Path, test_dir: Path) -> dict[str, Any]:
    """The bundle's pipeline.predict against the slimmed PyTorch model on every test image."""
    code = f"""
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {str(repo)!r})
from pipeline.deploy import check_manifest
from pipeline.predict import predict, preprocess
from pipeline.slim import load_slimmed_model
bundle = Path({str(repo)!r}) / "artifacts" / "handoff"
files = sorted(Path({str(test_dir)!r}).glob("*/*.jpg"))
got = [r["class"] for r in predict(bundle, files)]
manifest = check_manifest(json.loads((bundle / "manifest.json").read_text()))
net, _ = load_slimmed_model(Path({str(repo)!r}) / "artifacts" / "slim" / "model.pt")
with torch.no_grad():
    logits = torch.cat([net.eval()(torch.from_numpy(preprocess(files[i:i + 256], manifest.preprocessing)))
                        for i in range(0, len(files), 256)])
ref = [manifest.classes[i] for i in logits.argmax(1).tolist()]
truth = [f.parent.name for f in files]
print(json.dumps({{"images": len(files), "agree": sum(a == b for a, b in zip(got, ref)),
                  "bundle_correct": sum(a == t for a, t in zip(got, truth))}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["agreement"] = r["agree"] / r["images"]
    r["bundle_acc"] = r["bundle_correct"] / r["images"]
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "your_model")
    p.add_argument("--per-class", type=int, default=150, help="train images per class")
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--epochs", type=int, default=15, help="epochs of the outside training")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not ARCHIVE.is_file():
        print(f"needs {ARCHIVE} (CIFAR-10 JPEGs)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="your_model_"))
    repo = work / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    os.symlink(REPO / ".venv", repo / ".venv")  # the environment of `make install`, not re-installed
    data = repo / "data" / "mine"
    classes = make_folder(data, args.per_class, args.test_per_class, args.size, args.seed)
    outside = train_outside(data, classes, args.epochs, args.seed, repo / "weights" / "mine.pt")
    (repo / "params.yaml").write_text(yaml.safe_dump(readme_params(repo, args.size, args.budget), sort_keys=False))
    log = args.out / "run.log"
    code, _, run_s = run_logged(["make", "run"], log, repo, redraws=False)
    stages = {s["stage"]: s["seconds"] for s in stage_times_from_log(log)}
    result: dict[str, Any] = {
        "command": "python -m benchmarks.your_model " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "date": date.today().isoformat(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                 text=True).stdout.strip(),
        "data": {"classes": len(classes), "train_per_class": args.per_class, "test_per_class": args.test_per_class,
                 "size": args.size},
        "outside": outside, "exit": code, "run_s": run_s, "stages_s": stages,
        "ran_search_or_student": bool({"search", "train_student"} & set(stages)),
    }
    if code == 0:
        m = repo / "metrics"
        engine = json.loads((m / "engine.json").read_text())
        prune = json.loads((m / "prune.json").read_text())
        compare = json.loads((m / "compare.json").read_text())
        result.update({
            "input_model_test_acc": json.loads((m / "teachers" / "mine.json").read_text())["test_acc"],
            "compressed_test_acc": engine["test_acc"],
            "baselines_test_acc": {k: compare[k]["test_acc"] for k in compare.get("methods", [])},
            "baselines_over_budget": {k: compare[k].get("measured_over_budget") for k in compare.get("methods", [])},
            "student_ms": prune["student_ms"], "budget_ms": prune["budget_ms"],
            "prune_measured_over_budget": prune["measured_over_budget"],
            "engine": {"ms": engine["latency"]["ms"], "over_budget": engine["measured_over_budget"],
                       "status": engine["budget_status"], "verdict": engine["verdict"]},
            "predict": agreement(repo, data / "test"),
            "second_repro": subprocess.run(["dvc", "repro", "handoff", "ensemble"], cwd=repo, capture_output=True,
                                           text=True, env={**os.environ, "PATH": f"{repo / '.venv' / 'bin'}:"
                                                                                 f"{os.environ['PATH']}"}).stdout,
        })
        result["second_repro_ran_nothing"] = "Running stage" not in result.pop("second_repro")
    write_results(args.out, "result.json", result, table(result))
    print(table(result))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if code == 0 else 1


def table(r: dict[str, Any]) -> str:
    o = r["outside"]
    lines = [f"The README's \"Your own model and images\" followed on CIFAR-10 JPEGs ({r['data']['classes']} classes, "
             f"{r['data']['train_per_class']} train + {r['data']['test_per_class']} test images per class at "
             f"{r['data']['size']} px), commit {r['commit']}, {r['machine']}, {r['date']}: `make run` exit {r['exit']} "
             f"in {r['run_s']:.0f} s; search or student ran: {r['ran_search_or_student']}.", ""]
    if r["exit"] != 0:
        return "\n".join(lines)
    pr = r["predict"]
    lines += ["| network | test accuracy | measured latency |", "|---|---|---|",
              f"| your model (torchvision resnet18, {o['epochs']} epochs outside the pipeline; "
              f"{100 * o['test_acc_outside']:.2f}% in its own script) | {100 * r['input_model_test_acc']:.2f}% | "
              f"{r['student_ms']:.3f} ms |",
              f"| compressed (ours, budget {r['budget_ms']:.3f} ms) | {100 * r['compressed_test_acc']:.2f}% | "
              f"{r['engine']['ms']:.3f} ms ({r['engine']['over_budget']:.3f} of the budget) |"]
    for k, acc in r["baselines_test_acc"].items():
        ratio = r["baselines_over_budget"].get(k)
        lines.append(f"| {k} (compare) | {100 * acc:.2f}% | {ratio:.3f} of the budget |" if ratio else
                     f"| {k} (compare) | {100 * acc:.2f}% | - |")
    lines += ["", f"`pipeline.predict` on the bundle against the slimmed PyTorch model: {pr['agree']} of "
              f"{pr['images']} test images agree ({100 * pr['agreement']:.2f}%); bundle accuracy "
              f"{100 * pr['bundle_acc']:.2f}%. A second `dvc repro handoff ensemble` ran nothing: "
              f"{r['second_repro_ran_nothing']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
