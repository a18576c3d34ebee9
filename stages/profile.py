"""profile: measure the latency model of the network to be pruned on the deployment target: the
channel step (a repeated staircase probe, or the target's stated step), the lookup table on the
sampled lattice, and its calibration on random sub-networks, with the error on a held-out set."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import build_model
from pipeline.config import ProfileConfig, TargetConfig, parse_section
from pipeline.data import load_prepared
from pipeline.errors import ConfigError, SlimdeployError
from pipeline.io import write_csv, write_json
from pipeline.latency import (
    LatencyTable,
    build_table,
    calibrate,
    conv_layers,
    measure_step,
    target_backend,
    timing_protocol,
)
from pipeline.latency.calibrate import CalibrationResult
from pipeline.latency.staircase import StepDetection
from pipeline.plots import predicted_vs_measured_png, staircase_png
from pipeline.slim import ChannelGraph
from stages._common import add_precision_arg, deployed_target, load_params, log, parser, read_artifact, run


class PredictorContractError(SlimdeployError):
    """The calibrated predictor's held-out error is above the opt-in profile.max_mape."""


def _model(cfg: ProfileConfig, meta: dict[str, Any], arch_json: str) -> tuple[nn.Module, str, dict[str, Any]]:
    """The network to profile (eval mode), its registry name and its full ``arch_config``."""
    arch, extra = cfg.arch, dict(cfg.arch_config)
    if arch == "student":  # the network compress.model names
        searched = read_artifact(arch_json, ("arch", "arch_config"), "an architecture JSON",
                                 "train_student (or train_teacher)")
        arch, extra = searched["arch"], {**searched["arch_config"], **extra}
    arch_config = {"num_classes": meta["num_classes"], "in_channels": meta["channels"], **extra}
    try:
        return build_model(arch, **arch_config).eval(), arch, arch_config
    except ConfigError as err:
        raise ConfigError(f"profile.arch_config: {err}") from None


def _plots(table: LatencyTable, step: StepDetection, plots: Path, title: str) -> None:
    """Predicted against measured (fit and held-out sets) and the staircase probe, CSV and PNG."""
    cal = table.calibration
    write_csv(plots / "validation.csv", [{"set": name, "predicted_ms": s["predicted_ms"], "measured_ms": s["measured_ms"]}
                                         for name in ("fit", "heldout") for s in cal[f"{name}_set"]])
    held = cal["heldout_metrics"]
    predicted_vs_measured_png(
        [s["predicted_ms"] for s in cal["heldout_set"]], [s["measured_ms"] for s in cal["heldout_set"]],
        plots / "validation.png", f"{title}: held-out MAPE {held['mape']:.1%}, {held['within_10pct']:.0%} within 10%, "
        f"Spearman {held['spearman']:.3f}",
        extra=([s["predicted_ms"] for s in cal["fit_set"]], [s["measured_ms"] for s in cal["fit_set"]], "fit set"))
    if step.curve_ms:
        write_csv(plots / "staircase.csv", [{"out_channels": i + 1, "latency_ms": v} for i, v in enumerate(step.curve_ms)])
        staircase_png(list(step.curve_ms), plots / "staircase.png",
                      f"{step.layer} ({step.in_channels} in) on {title.split(' on ', 1)[-1].split(',')[0]}: detected "
                      f"step {step.detected}, used {step.step} ({step.source})", step.step)


def _metrics(cfg: ProfileConfig, target: TargetConfig, arch_config: dict[str, Any], table: LatencyTable,
             step: StepDetection, result: CalibrationResult, seconds: dict[str, float]) -> dict[str, Any]:
    held, fit = result.heldout_metrics, result.fit_metrics
    poor = held["mape"] > cfg.warn_mape
    return {
        "arch": cfg.arch, "arch_config": arch_config, "backend": target.backend, "device": table.fingerprint["device"],
        "batch_size": target.batch_size, "threads": target.threads, "full_latency_ms": table.full_ms,
        "step": {k: v for k, v in step.as_dict().items() if k not in ("curve_ms", "repeats_ms")},
        "multiple": table.step, "measurements": table.meta["measurements"], "removable_blocks": len(table.blocks),
        "overhead_ms": table.overhead_ms,
        "predictor": {
            "model": table.calibration["model"], "scale": table.calibration["scale"],
            "offset_ms": table.calibration["offset_ms"],
            **{f"heldout_{k}": v for k, v in held.items()}, **{f"fit_{k}": v for k, v in fit.items()},
            "uncalibrated_heldout_mape": result.uncalibrated_heldout_metrics["mape"],
            "full_predicted_ms": table.calibration["full"]["predicted_ms"], "poor": poor,
        },
        "noise": {"full_window_spread": result.full.spread, "full_p50_ms": result.full.p50_ms,
                  "median_heldout_window_spread": sorted(s.spread for s in result.heldout)[len(result.heldout) // 2]},
        "seconds": seconds, "warn_mape": cfg.warn_mape, "max_mape": cfg.max_mape,
        "warnings": ([f"latency predictor held-out MAPE {held['mape']:.1%} is above profile.warn_mape "
                      f"{cfg.warn_mape:.0%}: pruning is guided less well; the closed loop and the engine "
                      f"still measure the real network"] if poor else []),
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data directory (input shape, classes)")
    p.add_argument("--arch", required=True, help="architecture JSON of the network to compress (compress.model's "
                   "<stem>.arch.json; profile.arch: student)")
    p.add_argument("--out", required=True, help="latency table JSON path")
    p.add_argument("--metrics", required=True, help="metrics JSON path")
    p.add_argument("--plots-dir", required=True, help="directory for validation/staircase CSV and PNG")
    add_precision_arg(p)
    args = p.parse_args(argv)

    def body() -> None:
        t_start = time.perf_counter()
        params = load_params(args.params)
        target = deployed_target(params, args.precision)
        cfg = parse_section(params, "profile", ProfileConfig)
        backend = target_backend(target)
        meta = load_prepared(args.data).meta
        shape = (meta["channels"], *meta["image_size"])
        model, arch, arch_config = _model(cfg, meta, args.arch)
        torch.manual_seed(0)
        example = torch.zeros(1, *shape)
        specs = conv_layers(model, example, ChannelGraph(model, example).groups)

        t0 = time.perf_counter()
        probe = timing_protocol(target, passes=cfg.staircase_passes, min_span_s=0.0)
        step = measure_step(backend, specs, cfg.staircase_channels, cfg.staircase_repeats, probe, target.channel_step)
        t1 = time.perf_counter()
        table = build_table(model, shape, backend, {"arch": arch, "arch_config": arch_config}, step.step,
                            cfg.min_fraction, cfg.max_points, progress=cfg.progress)
        t2 = time.perf_counter()
        if all(len(widths) <= 1 for widths in table.lattice().values()):
            raise ConfigError(
                f"profile.min_fraction {cfg.min_fraction:g} with channel step {step.step} leaves every channel group at "
                f"its full width: there is nothing to prune or to calibrate on; lower profile.min_fraction (e.g. 0.25) "
                f"or target.channel_step")
        result = calibrate(model, table, backend, cfg.fit_samples, cfg.heldout_samples, cfg.seed, progress=cfg.progress)
        t3 = time.perf_counter()
        table.meta["staircase"] = step.as_dict()
        held = result.heldout_metrics
        _plots(table, step, Path(args.plots_dir),
               f"{cfg.arch} ({arch}) on {target.backend}/{table.fingerprint['device']['name']}, batch {target.batch_size}")
        metrics = _metrics(cfg, target, arch_config, table, step, result, {
            "staircase": t1 - t0, "table": t2 - t1, "calibration": t3 - t2, "total": time.perf_counter() - t_start})
        table.calibration["warnings"] = metrics["warnings"]  # travels with the table into the bundle's manifest
        if cfg.max_mape is not None and held["mape"] > cfg.max_mape:
            write_json(args.metrics, metrics)  # the evidence, for the person reading the error
            raise PredictorContractError(
                f"latency predictor held-out MAPE {held['mape']:.1%} on {held['samples']} sub-networks exceeds "
                f"profile.max_mape {cfg.max_mape:.0%} (opt-in; null turns the check off); see {args.metrics}")
        if metrics["predictor"]["poor"]:
            log.warning("latency predictor held-out MAPE %.1f%% is above profile.warn_mape %.0f%% (Spearman %.3f): "
                        "pruning is guided less well; the closed loop still measures the real network. Noise: the "
                        "full network's windows spread %.1f%%.", 100 * held["mape"], 100 * cfg.warn_mape,
                        held["spearman"], 100 * result.full.spread)
        table.save(args.out)
        write_json(args.metrics, metrics)
        log.info("latency model on %s: step %d (%s; repeats %s), %d table points; held-out MAPE %.2f%% (max %.2f%%, "
                 "%.0f%% within 10%%, Spearman %.3f) on %d sub-networks, %.2f%% before calibration; %.0f s",
                 target.backend, step.step, step.source, list(step.repeat_steps), table.meta["measurements"],
                 100 * held["mape"], 100 * held["max_ape"], 100 * held["within_10pct"], held["spearman"],
                 held["samples"], 100 * result.uncalibrated_heldout_metrics["mape"], time.perf_counter() - t_start)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
