"""Images streamed from disk (``prepare.storage: files``): memory and throughput at 224 px.

    python -m benchmarks.streaming --out benchmarks/results/streaming [--n 1000 --factor 4 --source-size 256]

1. An image folder of CIFAR-10 JPEGs (../shared/data/cifar10-jpeg) upscaled to ``--source-size``
   pixels (so each file decodes as a real-size photo would), ``factor x n`` training images; the
   folder of ``n`` images holds the first ``n`` of them (hard links).
2. For each folder, the real stage entry points as ``dvc repro`` runs them: ``stages.prepare``
   (``storage: files``, ``image_size: 224``), then one epoch of a small model (``--arch``, random
   initialisation) through ``pipeline.train.train_classifier``, the loop every training stage runs
   (``--epoch DIR``, in a process of its own; not the teacher stage itself, whose chance guard
   refuses a network after one epoch from scratch), with ``train.augment: random_resized_crop``
   and DataLoader workers (one per core). Memory: the peak, sampled every 0.2 s, of the proportional set size (PSS: pages shared by
   the DataLoader workers after fork counted once) summed over the stage's process and its workers,
   and the peak resident set of the stage's own process.
3. The in-memory path on the ``n`` folder (``storage: memory``, images decoded at 224 px into one
   array, ``augment: padcrop_flip``) for the same epoch: its memory and training images/s.

Images/s = training images / the epoch's seconds as the training loop reports them (the pass over
the training split, without the validation pass). One run each: the memory figures are
deterministic to a few MB; the throughput ones are one epoch on a shared 2-core machine.
Writes ``rows.json`` and ``table.md`` into ``--out``. Needs the CIFAR-10 archive; exits 2 without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks._runner import REPO, machine, write_results
from benchmarks.your_model import ARCHIVE, make_folder


def sampled_run(cmd: list[str], cwd: Path) -> dict[str, float]:
    """Run ``cmd``; peak PSS summed over it and its children, its own peak RSS (MB), wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})
    peak = {"tree_pss_mb": 0.0, "main_rss_mb": 0.0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                pss = 0.0
                for p in procs:
                    try:
                        pss += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peak["tree_pss_mb"] = max(peak["tree_pss_mb"], pss / 2**20)
                peak["main_rss_mb"] = max(peak["main_rss_mb"], root.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = proc.wait()
    done.set()
    t.join()
    if rc:
        raise SystemExit(f"{' '.join(cmd)} exited {rc}")
    return {**peak, "seconds": time.perf_counter() - t0}


def params_for(root: Path, storage: str, arch: str, batch: int) -> dict[str, Any]:
    prepare = {"source": "imagefolder", "root": str(root), "image_size": 224, "storage": storage,
               "val_fraction": 0.1, "test_fraction": 0.1}
    train = {"batch_size": batch, "eval_batch_size": 64, "progress": False,
             "augment": "random_resized_crop" if storage == "files" else "padcrop_flip", "crop_padding": 28}
    teacher = {"arch": arch, "arch_config": {}, "seed": 0, "epochs": 1,
               "optimizer": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                             "schedule": "cosine", "warmup_epochs": 0}}
    return {"prepare": prepare, "train": train, "teachers": {"m": teacher}}


def measure(root: Path, storage: str, images: int, arch: str, batch: int, work: Path) -> dict[str, Any]:
    """prepare and one epoch of ``arch`` on ``root``, through the stage entry points."""
    work.mkdir(parents=True, exist_ok=True)
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(params_for(root, storage, arch, batch), sort_keys=False))
    py = sys.executable
    prep = sampled_run([py, "-m", "stages.prepare", "--params", str(params), "--out", str(work / "data"),
                        "--metrics", str(work / "prepare.json")], REPO)
    train = sampled_run([py, "-m", "benchmarks.streaming", "--epoch", str(work)], REPO)
    sizes = json.loads((work / "prepare.json").read_text())
    epoch_s = json.loads((work / "epoch.json").read_text())["epoch_seconds"]
    return {"storage": storage, "images": images, "train_images": sizes["train_images"],
            "prepare": prep, "epoch": train, "epoch_seconds": epoch_s,
            "train_images_per_s": sizes["train_images"] / epoch_s, "arch": arch, "batch": batch}


def one_epoch(work: Path) -> None:
    """One epoch of the params' teacher ``m`` on the prepared data in ``work`` (the training split
    and the validation pass), as the training stages run it; writes ``epoch.json``."""
    import torch

    from models import build_model
    from pipeline.config import TeacherConfig, TrainConfig
    from pipeline.data import load_prepared
    from pipeline.train import train_classifier

    params = yaml.safe_load((work / "params.yaml").read_text())
    data = load_prepared(work / "data")
    cfg = TeacherConfig(**params["teachers"]["m"])
    torch.manual_seed(0)
    model = build_model(cfg.arch, num_classes=data.num_classes, in_channels=data.channels, **cfg.arch_config)
    res = train_classifier(model, data, TrainConfig(**params["train"]), cfg.optimizer, epochs=1, seed=0,
                           device=torch.device("cpu"))
    (work / "epoch.json").write_text(json.dumps({"epoch_seconds": res.history[0]["epoch_seconds"]}))


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"Streaming at 224 px ({meta['arch']}, batch {meta['batch']}, {meta['workers']} DataLoader workers), "
           f"{meta['machine']}, {meta['date']}, commit {meta['commit']}",
           f"`{meta['command']}`", "",
           "| storage | images in folder | train images | prepare peak PSS (MB) | prepare s | epoch peak PSS, "
           "all processes (MB) | epoch peak RSS, main (MB) | train images/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['storage']} | {r['images']} | {r['train_images']} | {r['prepare']['tree_pss_mb']:.0f} | "
                   f"{r['prepare']['seconds']:.1f} | {r['epoch']['tree_pss_mb']:.0f} | {r['epoch']['main_rss_mb']:.0f} | "
                   f"{r['train_images_per_s']:.1f} |")
    files = [r for r in rows if r["storage"] == "files"]
    if len(files) == 2:
        a, b = files
        out += ["", f"files, {b['images']} against {a['images']} images: prepare peak x"
                f"{b['prepare']['tree_pss_mb'] / a['prepare']['tree_pss_mb']:.3f}, epoch peak x"
                f"{b['epoch']['tree_pss_mb'] / a['epoch']['tree_pss_mb']:.3f}"]
    mem = [r for r in rows if r["storage"] == "memory"]
    if mem and files:
        out.append(f"train images/s, files against memory ({files[0]['images']} images): "
                   f"x{files[0]['train_images_per_s'] / mem[0]['train_images_per_s']:.3f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "streaming")
    p.add_argument("--n", type=int, default=1000, help="images of the smaller folder (divisible by 10)")
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--source-size", type=int, default=256, help="pixels of the JPEG files on disk")
    p.add_argument("--arch", default="torchvision:mobilenet_v3_small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epoch", type=Path, help=argparse.SUPPRESS)  # internal: one epoch in WORKDIR
    args = p.parse_args(argv)
    if args.epoch is not None:
        one_epoch(args.epoch)
        return 0
    if not ARCHIVE.is_file():
        print(f"error: needs the CIFAR-10 archive at {ARCHIVE}", file=sys.stderr)
        return 2
    from pipeline.streaming import default_workers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = tmp / "big"
        make_folder(big, args.n * args.factor // 10, 0, args.source_size, seed=0)
        small = tmp / "small"
        for cls in sorted((big / "train").iterdir()):
            for f in sorted(cls.iterdir())[: args.n // 10]:
                (small / "train" / cls.name).mkdir(parents=True, exist_ok=True)
                os.link(f, small / "train" / cls.name / f.name)
        rows = [measure(small, "files", args.n, args.arch, args.batch, tmp / "w_small"),
                measure(big, "files", args.n * args.factor, args.arch, args.batch, tmp / "w_big"),
                measure(small, "memory", args.n, args.arch, args.batch, tmp / "w_mem")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = {"machine": machine(), "date": date.today().isoformat(), "commit": commit, "arch": args.arch,
            "batch": args.batch, "workers": default_workers(), "source_size": args.source_size,
            "command": "python -m benchmarks.streaming " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_results(args.out, "rows.json", {"meta": meta, "rows": rows}, table(rows, meta))
    print(table(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
