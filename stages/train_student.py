"""train_student: build the searched architecture from arch.json as an ordinary registry model
and train it from scratch with the oracle distillation loss."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from models import build_model
from pipeline.checkpoint import load_teachers, save_checkpoint, write_arch_file
from pipeline.config import DistillConfig, StudentConfig, TrainConfig, parse_section, parse_teachers
from pipeline.data import load_prepared
from pipeline.distill import kd_criterion, training_ensemble
from pipeline.ensemble import ensemble_report
from pipeline.flops import count_flops, count_params
from pipeline.io import file_sha256, write_csv, write_json
from pipeline.runtime import describe_device, shutdown_distributed, start_training
from pipeline.train import check_above_chance, predict_logits, test_accuracy, train_classifier
from stages._common import digest, load_params, log, parser, read_arch, run


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--teachers", required=True, help="directory of teacher checkpoints")
    p.add_argument("--arch", required=True, help="arch.json from the search stage")
    p.add_argument("--out", required=True, help="student checkpoint path")
    p.add_argument("--metrics", required=True)
    p.add_argument("--plots", required=True, help="per-epoch history CSV")
    p.add_argument("--resume-dir", default=".resume")
    args = p.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        cfg = parse_section(params, "student", StudentConfig)
        kd = parse_section(params, "distill", DistillConfig)
        train_cfg = parse_section(params, "train", TrainConfig)
        names = list(parse_teachers(params))
        data = load_prepared(args.data)
        searched = read_arch(args.arch)
        arch_config = {"num_classes": data.num_classes, "in_channels": data.channels, **searched["arch_config"]}
        torch.manual_seed(cfg.seed)
        model = build_model(searched["arch"], **arch_config)
        teachers = load_teachers(args.teachers, names, data.meta)
        device, ctx = start_training(train_cfg.device, train_cfg.num_threads)
        ensemble = training_ensemble(list(teachers.values()), data.train, *data.norm(), train_cfg.augment, device,
                                     train_cfg.batch_size // ctx.world_size)
        teacher_files = [file_sha256(Path(args.teachers) / f"{n}.pt") for n in names]  # retrained -> no resume
        fingerprint = digest(cfg.model_dump(), kd.model_dump(), train_cfg.model_dump(exclude={"progress"}),
                             searched, data.meta["split_hashes"], teacher_files, ctx.world_size)
        resume = Path(args.resume_dir) / "train_student" / "student.pt"
        try:
            result = train_classifier(
                model, data, train_cfg, cfg.optimizer, epochs=cfg.epochs, seed=cfg.seed, device=device, ctx=ctx,
                criterion=kd_criterion(ensemble, kd.temperature, kd.alpha, kd.mode, kd.average),
                resume_path=resume, fingerprint=fingerprint, desc="student",
            )
        finally:
            shutdown_distributed()
        if not ctx.is_main:
            return
        model.load_state_dict(result.best_state)
        cpu = torch.device("cpu")
        test_acc = test_accuracy(model.to(cpu), data, cpu)
        check_above_chance(test_acc, data.num_classes, len(data.test.y), "student (test split)", resume)
        mean, std = data.norm()
        # the ensemble moved the teachers to the training device: evaluate them where the inputs are
        t_logits = torch.stack([predict_logits(t.to(cpu), data.test, mean, std, cpu) for t in teachers.values()])
        ens = ensemble_report(t_logits, data.test.y, names, data.meta["classes"])
        shape = (data.channels, *data.meta["image_size"])
        n_params, flops = count_params(model), count_flops(model, shape)
        largest = max(count_params(t) for t in teachers.values())
        save_checkpoint(args.out, searched["arch"], arch_config, result.best_state,
                        {"stage": "train_student", "val_acc": result.best_val_acc, "test_acc": test_acc,
                         "data_hash": data.meta["split_hashes"]["train"], "classes": data.meta["classes"]})
        write_arch_file(args.out, searched["arch"], arch_config)  # what profile builds the latency table from
        write_csv(args.plots, result.history)
        epoch_s = [h["epoch_seconds"] for h in result.history]
        write_json(args.metrics, {
            "arch_config": searched["arch_config"], "params": n_params, "flops": flops,
            "params_ratio_of_largest_teacher": n_params / largest, "budget_params": searched["budget_params"],
            "within_budget": n_params <= searched["budget_params"],
            "distill": kd.model_dump(), "epochs": cfg.epochs, "best_epoch": result.best_epoch, "step_mode": result.step_mode,
            "val_acc": result.best_val_acc, "test_acc": test_acc,
            "ensemble_acc": ens["ensemble_acc"], "best_teacher_acc": ens["best_member_acc"],
            "oracle_acc": ens["oracle_acc"], "gap_to_ensemble": test_acc - ens["ensemble_acc"],
            "gap_to_best_teacher": test_acc - ens["best_member_acc"],
            "epoch_seconds_median": statistics.median(epoch_s), "device": describe_device(device),
        })
        resume.unlink(missing_ok=True)
        log.info("student: %s params (%.1f%% of the largest teacher), test %.4f (best teacher %.4f, ensemble %.4f)",
                 f"{n_params:,}", 100 * n_params / largest, test_acc, ens["best_member_acc"], ens["ensemble_acc"])

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
