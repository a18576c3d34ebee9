"""profile: measure the latency lookup table of the network to be pruned on the deployment target,
check the predictor against real sub-networks, and record the staircase of one layer."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from models import build_model
from pipeline.config import ProfileConfig, TargetConfig, parse_section
from pipeline.data import load_prepared
from pipeline.errors import ConfigError, SlimdeployError
from pipeline.io import write_csv, write_json
from pipeline.latency import target_backend
from pipeline.latency_table import build_table, noise_floor, validate
from pipeline.plots import predicted_vs_measured_png, staircase_png
from stages._common import load_params, log, parser, read_arch, run


class PredictorContractError(SlimdeployError):
    """The lookup table predicts measured latency worse than profile.max_mape allows."""


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data directory (input shape, classes)")
    p.add_argument("--student-arch", required=True, help="arch.json of the searched student (profile.arch: student)")
    p.add_argument("--out", required=True, help="latency table JSON path")
    p.add_argument("--metrics", required=True, help="metrics JSON path")
    p.add_argument("--plots-dir", required=True, help="directory for validation/staircase CSV and PNG")
    args = p.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        target = parse_section(params, "target", TargetConfig)
        cfg = parse_section(params, "profile", ProfileConfig)
        backend = target_backend(target, cfg.min_run_time, cfg.warmup)
        meta = load_prepared(args.data).meta
        shape = (meta["channels"], *meta["image_size"])
        arch, extra = cfg.arch, dict(cfg.arch_config)
        if arch == "student":
            searched = read_arch(args.student_arch)
            arch, extra = searched["arch"], {**searched["arch_config"], **extra}
        arch_config = {"num_classes": meta["num_classes"], "in_channels": meta["channels"], **extra}
        try:
            model = build_model(arch, **arch_config).eval()
        except ConfigError as err:
            raise ConfigError(f"profile.arch_config: {err}") from None
        torch.manual_seed(0)
        table = build_table(model, shape, backend, {"arch": arch, "arch_config": arch_config}, cfg.multiple,
                            cfg.min_fraction, cfg.max_seconds, cfg.staircase_channels, cfg.progress)
        lattice = validate(model, table, backend, cfg.validation_samples, cfg.validation_seed, True, cfg.progress)
        anywidth = validate(model, table, backend, cfg.validation_samples, cfg.validation_seed + 1, False, cfg.progress)
        noise = noise_floor(model, backend, shape, cfg.noise_repeats)
        m_lat, m_any = lattice.metrics(), anywidth.metrics()
        plots = Path(args.plots_dir)
        write_csv(plots / "validation.csv", [
            {"predicted_ms": pr, "measured_ms": me, "widths": kind}
            for v, kind in ((lattice, "lattice"), (anywidth, "any"))
            for pr, me in zip(v.predicted_ms, v.measured_ms)
        ])
        dev = table.fingerprint["device"]["name"]
        predicted_vs_measured_png(
            lattice.predicted_ms, lattice.measured_ms, plots / "validation.png",
            f"{cfg.arch} ({arch}) on {target.backend}/{dev}, batch {target.batch_size}: MAPE {m_lat['mape']:.1%} "
            f"(lattice), {m_any['mape']:.1%} (any width)",
            extra=(anywidth.predicted_ms, anywidth.measured_ms, "any channel count"),
        )
        stair = table.meta["staircase"]
        if stair["ms"]:
            write_csv(plots / "staircase.csv", [{"out_channels": i + 1, "latency_ms": v} for i, v in enumerate(stair["ms"])])
            staircase_png(stair["ms"], plots / "staircase.png",
                          f"{stair['layer']} ({stair['in_channels']} in) on {target.backend}/{dev}: "
                          f"step {table.meta['detected_multiple']} channels", table.meta["detected_multiple"])
        metrics = {
            "arch": cfg.arch, "arch_config": arch_config, "backend": target.backend, "device": table.fingerprint["device"],
            "batch_size": target.batch_size, "threads": target.threads,
            "full_latency_ms": table.full_ms, "multiple": table.meta["multiple"],
            "detected_multiple": table.meta["detected_multiple"], "measurements": table.meta["measurements"],
            "table_seconds": table.meta["seconds"], "remainder_ms": table.remainder_ms,
            "overhead_ms": table.overhead_ms,
            "predictor": {f"lattice_{k}": v for k, v in m_lat.items()} | {f"any_{k}": v for k, v in m_any.items()},
            "noise_floor": noise,
            "max_mape": cfg.max_mape,
        }
        if m_lat["mape"] > cfg.max_mape:
            write_json(args.metrics, metrics)  # the evidence, for the person reading the error
            raise PredictorContractError(
                f"latency predictor MAPE {m_lat['mape']:.1%} on {m_lat['samples']} sub-networks exceeds "
                f"profile.max_mape {cfg.max_mape:.0%}; noise floor {noise['mean_abs_dev_pct']:.1f}% (see {args.metrics})"
            )
        table.save(args.out)
        write_json(args.metrics, metrics)
        log.info("latency table: %d measurements in %.0f s, step %d channels; predictor MAPE %.2f%% (max %.2f%%, "
                 "Spearman %.3f) on the lattice, %.2f%% at any width; noise floor %.2f%%",
                 table.meta["measurements"], table.meta["seconds"], table.meta["multiple"], 100 * m_lat["mape"],
                 100 * m_lat["max_ape"], m_lat["spearman"], 100 * m_any["mape"], noise["mean_abs_dev_pct"])

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
