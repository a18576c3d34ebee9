"""compare: baselines cut from the same student to the pruned model's measured latency (uniform
width scaling; Torch-Pruning global L1 magnitude), fine-tuned with the same distillation loss for
as many epochs as the prune stage trained, all measured in this run on the target."""

from __future__ import annotations

import sys
import time

import torch

from pipeline.checkpoint import load_model
from pipeline.compare import describe, l1_candidates, match_latency, uniform_candidates
from pipeline.config import (CompareConfig, DistillConfig, PruneConfig, TargetConfig, TrainConfig, parse_section,
                             parse_teachers)
from pipeline.data import load_prepared
from pipeline.distill import TeacherEnsemble, kd_criterion
from pipeline.flops import count_params
from pipeline.io import write_json
from pipeline.latency import LatencyTable, target_backend
from pipeline.prune import allowed_widths
from pipeline.runtime import describe_device, resolve_device
from pipeline.slim import channel_groups, masks_from_kept, prune_structure
from pipeline.train import check_above_chance, test_accuracy, train_classifier
from stages._common import load_params, log, parser, read_pruned, run
from stages._teachers import load_student, load_teachers

RATIOS = [round(0.05 * i, 2) for i in range(20, 0, -1)]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--teachers", required=True, help="directory of teacher checkpoints")
    p.add_argument("--student", required=True, help="trained student checkpoint")
    p.add_argument("--table", required=True, help="latency table (its channel lattice)")
    p.add_argument("--pruned", required=True, help="masks.json of the prune stage")
    p.add_argument("--model", required=True, help="masked checkpoint of the prune stage")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)

    def body() -> None:
        t0 = time.perf_counter()
        params = load_params(args.params)
        cfg = parse_section(params, "compare", CompareConfig)
        prune_cfg = parse_section(params, "prune", PruneConfig)
        target = parse_section(params, "target", TargetConfig)
        kd = parse_section(params, "distill", DistillConfig)
        train_cfg = parse_section(params, "train", TrainConfig)
        names = list(parse_teachers(params))
        data = load_prepared(args.data)
        student, _ = load_student(args.student, data.meta)
        shape = (data.channels, *data.meta["image_size"])
        example = torch.zeros(1, *shape)
        backend = target_backend(target)
        table = LatencyTable.load(args.table, fingerprint=backend.fingerprint())
        pruned = read_pruned(args.pruned, "kept")
        kept = pruned["kept"]
        masked, _ = load_model(args.model)
        ours = prune_structure(masked, example, masks_from_kept(channel_groups(masked, example), kept))
        cpu = torch.device("cpu")

        def measure(model: torch.nn.Module) -> float:
            return backend.measure(model, shape).ms

        ours_ms = measure(ours)
        result: dict = {"ours": {"measured_ms": ours_ms, "test_acc": test_accuracy(ours, data, cpu),
                                 "params": count_params(ours), "widths": pruned.get("widths")},
                        "student": {"measured_ms": measure(student), "test_acc": test_accuracy(student, data, cpu)},
                        "epochs": prune_cfg.epochs, "methods": list(cfg.methods), "tolerance": cfg.tolerance}
        if cfg.methods:
            device = resolve_device(train_cfg.device)
            ensemble = TeacherEnsemble(list(load_teachers(args.teachers, names, data.meta).values())).to(device)
            criterion = kd_criterion(ensemble, kd.temperature, kd.alpha, kd.mode, kd.average)
            multiple = prune_cfg.multiple or table.step
            low = float(table.meta["min_fraction"])
            sizes = {g.name: g.size for g in channel_groups(student, example)}
            allowed = {g: allowed_widths(n, multiple, low) for g, n in sizes.items()}
        for method in cfg.methods:
            if method == "uniform":
                cands = uniform_candidates(student, example, allowed, RATIOS)
            else:
                cands = l1_candidates(student, example, [r for r in RATIOS if r < 1.0], multiple, 1.0 - low)
            chosen = match_latency(cands, measure, ours_ms, cfg.tolerance)
            before = test_accuracy(chosen.model, data, cpu)
            train_classifier(chosen.model, data, train_cfg, prune_cfg.optimizer, epochs=prune_cfg.epochs,
                             seed=cfg.seed, device=device, criterion=criterion, desc=f"{method} fine-tune")
            chosen.model.to(cpu)
            after = test_accuracy(chosen.model, data, cpu)  # last epoch's weights, as for ours
            check_above_chance(after, data.num_classes, len(data.test.y), f"compare: {method} baseline (test split)")
            result[method] = describe(chosen, before, after, count_params(chosen.model),
                                      {"candidates": {c.label: c.measured_ms for c in cands},
                                       "measured_over_ours": chosen.measured_ms / ours_ms})
            result[f"ours_minus_{method}"] = result["ours"]["test_acc"] - after
            log.info("%s: %s, %.4f ms (ours %.4f ms), test acc %.4f -> %.4f after %d epochs (ours %.4f)", method,
                     chosen.label, chosen.measured_ms, ours_ms, before, after, prune_cfg.epochs,
                     result["ours"]["test_acc"])
        result.update(backend=target.backend, device=backend.fingerprint()["device"],
                      seconds=time.perf_counter() - t0)
        if cfg.methods:
            result["train_device"] = describe_device(device)
        write_json(args.metrics, result)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
