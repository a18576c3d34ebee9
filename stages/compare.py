"""compare: the baselines under the same protocol as ours (pipeline/compare.py): cut from the same
student to the same measured-latency band of the budget (uniform width scaling, its width ratio
swept; Torch-Pruning global L1 magnitude, its pruning ratio swept), trained with the
same distillation loss for as many epochs as the prune stage trained, and measured together with
ours and the student at the end. ``unpruned``: the student itself trained as many more epochs the
same way, the equal-training reference every pruned network is judged against (the student's own
accuracy had that many fewer epochs); it is not cut to the budget and is no baseline to beat."""

from __future__ import annotations

import copy
import sys
import time

import torch

from pipeline.checkpoint import load_model
from pipeline.compare import (Candidate, candidates, describe, l1_candidate, match_budget, uniform_candidate,
                              uniform_widths)
from pipeline.config import (CompareConfig, DistillConfig, PruneConfig, TargetConfig, TrainConfig, parse_section,
                             parse_teachers)
from pipeline.data import load_prepared, load_split
from pipeline.distill import TeacherEnsemble, kd_criterion
from pipeline.flops import count_params
from pipeline.io import file_sha256, write_json
from pipeline.latency import LatencyTable, target_backend, timing_protocol
from pipeline.prune import allowed_widths, effective_band
from pipeline.runtime import describe_device, resolve_device
from pipeline.slim import ChannelGraph, channel_groups, masks_from_kept, prune_structure
from pipeline.train import check_above_chance, test_accuracy, train_classifier
from stages._common import load_params, log, parser, read_pruned, run
from stages._teachers import load_student, load_teachers


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--teachers", required=True, help="directory of teacher checkpoints")
    p.add_argument("--student", required=True, help="trained student checkpoint")
    p.add_argument("--table", required=True, help="latency table (its channel lattice)")
    p.add_argument("--pruned", required=True, help="masks.json of the prune stage")
    p.add_argument("--model", required=True, help="masked checkpoint of the prune stage")
    p.add_argument("--metrics", required=True)
    p.add_argument("--holdout", default=None, help="optional .npz split (x uint8 NCHW, y) every network is also "
                   "scored on, as holdout_acc (benchmarks: a larger test set than the prepared one)")
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
        holdout = load_split(args.holdout, data.meta) if args.holdout else None
        student, _ = load_student(args.student, data.meta)
        shape = (data.channels, *data.meta["image_size"])
        example = torch.zeros(1, *shape)
        backend = target_backend(target)
        table = LatencyTable.load(args.table, fingerprint=backend.fingerprint())
        pruned = read_pruned(args.pruned, "kept", "budget_ms", "student_ms")
        budget_ms, student_ms = pruned["budget_ms"], pruned["student_ms"]
        band = effective_band(prune_cfg.band, float(pruned.get("noise", 0.0)))
        masked, _ = load_model(args.model)
        ours = prune_structure(masked, example, masks_from_kept(channel_groups(masked, example), pruned["kept"]))
        cpu = torch.device("cpu")
        # a verdict's protocol: more windows over a longer span than target.timing's, which the profile stage
        # spends on hundreds of models; one reading of the fastest of 10 windows over 0.5 s is a noisy extreme,
        # and a baseline's match and its final reading once disagreed by 26% (docs/BENCHMARKS.md, section 37)
        verdict = timing_protocol(target, passes=cfg.timing_passes, min_span_s=cfg.timing_span_s)

        def measure(model: torch.nn.Module) -> float:
            # paired with the student, as the prune stage's closed loop measures ours
            t_model, t_student = backend.measure_many([model, student], shape, verdict)
            return student_ms * t_model.ms / t_student.ms

        result: dict = {
            "protocol": {"budget_ms": budget_ms, "band": list(band), "epochs": prune_cfg.epochs,
                         "loss": f"distill ({kd.mode}, T={kd.temperature}, alpha={kd.alpha})", "seed": cfg.seed,
                         "measured": f"paired with the student, interleaved windows: the fastest of {verdict.passes} "
                                     f"over at least {verdict.min_span_s:g} s"},
            "ours": {"test_acc": test_accuracy(ours, data, cpu), "params": count_params(ours),
                     "widths": pruned.get("widths"), "measured_ms_prune_stage": pruned.get("measured_ms")},
            "student": {"test_acc": test_accuracy(student, data, cpu), "measured_ms": student_ms},
            "methods": list(cfg.methods),
        }
        finals: dict[str, torch.nn.Module] = {"ours": ours}
        if cfg.methods:
            device = resolve_device(train_cfg.device)
            ensemble = TeacherEnsemble(list(load_teachers(args.teachers, names, data.meta).values())).to(device)
            criterion = kd_criterion(ensemble, kd.temperature, kd.alpha, kd.mode, kd.average)
            multiple = prune_cfg.multiple or table.step
            low = float(table.meta["min_fraction"])
            graph = ChannelGraph(student, example)
            allowed = {g.name: allowed_widths(g.size, multiple, low) for g in graph.groups}
            sizes = {g.name: g.size for g in graph.groups}
        predictor = table.predictor()

        def predict(c: Candidate) -> float:  # groups are named by their root convolution: its output width
            return predictor({g: float(c.widths[g]) for g in table.groups}).item()

        for method in cfg.methods:
            probes: list[dict] = []
            if method == "unpruned":  # nothing to match: the same training on the whole student
                chosen = Candidate("unpruned student", copy.deepcopy(student), dict(sizes), student_ms)
            else:
                if method == "uniform":
                    knobs = [low + (1 - low) * i / 1000 for i in range(1001)]  # fine: groups step one at a time
                    cands = candidates(lambda k: uniform_candidate(student, example, allowed, k, graph), knobs,
                                       key=lambda k: tuple(sorted(uniform_widths(sizes, allowed, k).items())))
                else:
                    knobs = [(1 - low) * i / 60 for i in range(61)]
                    cands = candidates(lambda k: l1_candidate(student, example, k, multiple, 1.0 - low), knobs)
                match = match_budget(cands, predict, measure, band[1] * budget_ms)
                chosen, probes = match.chosen, match.probes
            before = test_accuracy(chosen.model, data, cpu)
            train_classifier(chosen.model, data, train_cfg, prune_cfg.optimizer, epochs=prune_cfg.epochs,
                             seed=cfg.seed, device=device, criterion=criterion, desc=f"{method} fine-tune")
            chosen.model.to(cpu).eval()
            after = test_accuracy(chosen.model, data, cpu)  # last epoch's weights, as for ours
            check_above_chance(after, data.num_classes, len(data.test.y), f"compare: {method} baseline (test split)")
            result[method] = describe(chosen, before, after, count_params(chosen.model), {"probes": probes})
            finals[method] = chosen.model
            log.info("%s: %s, %.4f ms (%.3f of the budget), test acc %.4f -> %.4f after %d epochs", method,
                     chosen.label, chosen.measured_ms, chosen.measured_ms / budget_ms, before, after, prune_cfg.epochs)
        # every final network measured together, with the student, in one interleaved run
        timings = backend.measure_many([student, *finals.values()], shape, verdict)
        for (name, _), t in zip(finals.items(), timings[1:]):
            ms = student_ms * t.ms / timings[0].ms
            result[name].update(measured_ms=ms, measured_spread=t.spread, measured_over_budget=ms / budget_ms,
                                in_band=band[0] * budget_ms <= ms <= band[1] * budget_ms)
        if holdout is not None:
            result["holdout"] = {"path": str(args.holdout), "images": len(holdout), "sha256": file_sha256(args.holdout)}
            for name, model in (("student", student), *finals.items()):
                result[name]["holdout_acc"] = test_accuracy(model, data, cpu, split=holdout)
        for method in cfg.methods:
            result[f"ours_minus_{method}"] = result["ours"]["test_acc"] - result[method]["test_acc"]
        log.info("at %.4f ms budget: ours %.4f (%.3f of the budget)%s", budget_ms, result["ours"]["test_acc"],
                 result["ours"]["measured_over_budget"], "".join(
                     f", {m} {result[m]['test_acc']:.4f} ({result[m]['measured_over_budget']:.3f})" for m in cfg.methods))
        result.update(backend=target.backend, device=backend.fingerprint()["device"],
                      seconds=time.perf_counter() - t0)
        if cfg.methods:
            result["train_device"] = describe_device(device)
        write_json(args.metrics, result)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
