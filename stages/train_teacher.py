"""train_teacher: train one member of the teacher ensemble (``teachers.<name>`` in params).

With ``weights`` the teacher starts from them (a file inside ``--weights-dir`` or a torchvision
weights name) and fine-tunes ``epochs`` epochs; ``epochs: 0`` evaluates and saves them as they are.
Launch plainly (``python -m stages.train_teacher --name t0 ...``) or under torchrun for DDP.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from models import build_model
from pipeline.checkpoint import save_checkpoint, write_arch_file
from pipeline.config import TrainConfig, parse_section, parse_teachers
from pipeline.data import load_prepared
from pipeline.errors import ConfigError
from pipeline.io import write_csv, write_json
from pipeline.plots import history_png
from pipeline.pretrained import evaluate_as_is, load_entry_weights
from pipeline.runtime import describe_device, shutdown_distributed, start_training
from pipeline.train import check_above_chance, test_accuracy, train_classifier
from stages._common import digest, load_params, log, parser, run


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--name", required=True, help="key under `teachers:` in params")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--metrics", required=True, help="metrics JSON path")
    p.add_argument("--plots", required=True, help="per-epoch history CSV path (a PNG is written beside it)")
    p.add_argument("--resume-dir", default=".resume", help="where the resume state lives until the stage succeeds")
    p.add_argument("--weights-dir", default="weights", help="folder a weights file must lie in (a dvc.yaml dependency)")
    args = p.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        train_cfg = parse_section(params, "train", TrainConfig)
        teachers = parse_teachers(params)
        if args.name not in teachers:
            raise ConfigError(f"--name {args.name!r} is not under teachers: (have {sorted(teachers)})")
        cfg = teachers[args.name]
        data = load_prepared(args.data)
        arch_config = {"num_classes": data.num_classes, "in_channels": data.channels, **cfg.arch_config}
        torch.manual_seed(cfg.seed)
        try:
            model = build_model(cfg.arch, **arch_config)
        except ConfigError as err:
            key = "arch_config" if str(err).startswith("arch_config") else "arch"
            raise ConfigError(f"teachers.{args.name}.{key}: {err}") from None
        weights = None
        if cfg.weights is not None:
            try:
                weights = load_entry_weights(model, cfg.arch, cfg.weights, args.weights_dir)
            except ConfigError as err:
                raise type(err)(f"teachers.{args.name}.weights: {err}") from None
            if cfg.epochs == 0 and weights.replaced:
                raise ConfigError(f"teachers.{args.name}: epochs: 0 uses the weights as they are, but {weights.replaced} "
                                  f"were replaced by a fresh initialisation (the weights have another class count or "
                                  "input channels), which needs training: set epochs >= 1")

        device, ctx = start_training(train_cfg.device, train_cfg.num_threads)
        fingerprint = digest(cfg.model_dump(), train_cfg.model_dump(exclude={"progress"}),
                             data.meta["split_hashes"], ctx.world_size, weights and weights.sha256)
        resume = Path(args.resume_dir) / "train_teacher" / f"{args.name}.pt"
        try:
            if cfg.epochs == 0:
                result = evaluate_as_is(model, data, train_cfg, device)
            else:
                result = train_classifier(
                    model, data, train_cfg, cfg.optimizer, epochs=cfg.epochs, seed=cfg.seed, device=device,
                    ctx=ctx, resume_path=resume, fingerprint=fingerprint, desc=f"teacher {args.name}",
                )
        finally:
            shutdown_distributed()
        if not ctx.is_main:
            return
        model.load_state_dict(result.best_state)
        test_acc = test_accuracy(model, data, device, train_cfg.eval_batch_size, train_cfg.amp)
        check_above_chance(test_acc, data.num_classes, len(data.test.y), f"teacher {args.name} (test split)", resume)
        epoch_s = [h["epoch_seconds"] for h in result.history]
        meta = {
            "stage": "train_teacher", "name": args.name, "best_epoch": result.best_epoch,
            "val_acc": result.best_val_acc, "test_acc": test_acc,
            "data_hash": data.meta["split_hashes"]["train"], "classes": data.meta["classes"],
            "weights": weights and weights.report(),
        }
        save_checkpoint(args.out, cfg.arch, arch_config, result.best_state, meta)
        write_arch_file(args.out, cfg.arch, arch_config)  # compress.model may name this teacher
        write_csv(args.plots, result.history)
        history_png(result.history, Path(args.plots).with_suffix(".png"), f"teacher {args.name} ({cfg.arch})")
        write_json(args.metrics, {
            "name": args.name, "arch": cfg.arch,
            "params": sum(p.numel() for p in model.parameters()),
            "epochs": cfg.epochs, "best_epoch": result.best_epoch, "step_mode": result.step_mode,
            "weights": weights and weights.report(),
            "val_acc": result.best_val_acc, "test_acc": test_acc,
            "epoch_seconds_median": statistics.median(epoch_s),
            "epoch_seconds_min": min(epoch_s), "epoch_seconds_max": max(epoch_s),
            "world_size": ctx.world_size, "device": describe_device(device),
        })
        resume.unlink(missing_ok=True)
        log.info("teacher %s (%s): val %.4f (epoch %d), test %.4f, %.2f s/epoch", args.name, cfg.arch,
                 result.best_val_acc, result.best_epoch, test_acc, statistics.median(epoch_s))

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
