"""handoff: the bundle for the deploy team: engine, ONNX, manifest (input, preprocessing, classes,
accuracy, latency, budget, device, versions, git revision, sha256 of every file), a README, and
plots (accuracy against measured latency for teachers, student and pruned model; kept widths)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from pipeline.checkpoint import load_model
from pipeline.config import CompressConfig, HandoffConfig, parse_section, parse_teachers
from pipeline.data import load_prepared
from pipeline.deploy import check_manifest, model_card, sha256, verify_bundle
from pipeline.errors import CheckpointError
from pipeline.handoff import baseline_points, bundle_manifest, bundle_readme, git_revision, latency_model_record, point
from pipeline.io import atomic_dir, read_json, write_json
from pipeline.latency import LatencyTable, target_backend
from pipeline.plots import pareto_png
from pipeline.slim import load_slimmed_model
from pipeline.train import test_accuracy
from stages._common import add_precision_arg, deployed_target, load_params, log, parser, run


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--teachers", required=True, help="directory of teacher checkpoints")
    p.add_argument("--student", required=True, help="student checkpoint")
    p.add_argument("--slim", required=True, help="slimmed checkpoint")
    p.add_argument("--onnx", required=True, help="ONNX model (export stage)")
    p.add_argument("--engine-dir", required=True, help="engine directory (engine stage)")
    p.add_argument("--widths-png", required=True, help="kept-widths plot of the prune stage")
    p.add_argument("--compare", default=None, help="metrics of the compare stage (optional, for the plot)")
    p.add_argument("--latency-table", required=True, help="latency table of the profile stage (its error goes "
                   "into the manifest)")
    p.add_argument("--out-dir", required=True, help="bundle directory")
    add_precision_arg(p)
    args = p.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        cfg = parse_section(params, "handoff", HandoffConfig)
        target = deployed_target(params, args.precision, args.student)
        names = list(parse_teachers(params))
        source = parse_section(params, "compress", CompressConfig) if "compress" in params else CompressConfig()
        data = load_prepared(args.data)
        engine_dir = Path(args.engine_dir)
        try:
            eng = read_json(engine_dir / "engine.json")
        except (FileNotFoundError, ValueError) as err:
            raise CheckpointError(f"{engine_dir / 'engine.json'} missing or unreadable ({err}); run the engine stage") from None
        slimmed, slim_ckpt = load_slimmed_model(args.slim)
        shape = (data.channels, *data.meta["image_size"])
        n_test = len(data.test.y)

        # accuracy against latency measured on the target, every model the same way
        entries = [("teachers", n, load_model(Path(args.teachers) / f"{n}.pt")[0]) for n in names]
        start, start_ckpt = load_model(args.student)
        # the network compressed: the searched student, or a teacher entry (your model), named as such
        entries += [("student" if source.teacher is None else f"input model ({source.teacher})", "student", start),
                    ("pruned (ours)", "pruned", slimmed)]
        timings = target_backend(target).measure_many([m for _, _, m in entries], shape)  # interleaved
        points = [point(method, n, t.ms, t.spread, test_accuracy(m, data, torch.device("cpu")), n_test)
                  for (method, n, m), t in zip(entries, timings)]
        if args.compare and Path(args.compare).is_file():
            points += baseline_points(read_json(args.compare), timings[-1].ms, n_test)
        latency_model = latency_model_record(LatencyTable.load(args.latency_table))
        git = git_revision()
        card = model_card(data.meta)  # what export stored inside model.onnx; the manifest repeats it
        with atomic_dir(args.out_dir) as tmp:
            shutil.copyfile(args.onnx, tmp / "model.onnx")
            shutil.copyfile(engine_dir / eng["engine_file"], tmp / eng["engine_file"])
            shutil.copyfile(args.widths_png, tmp / "widths.png")
            pareto_png(points, tmp / "pareto.png",
                       f"test accuracy vs latency on {target.backend}/{eng['device'].get('name', '?')}, batch "
                       f"{target.batch_size}",
                       f"error bars: accuracy +-1 standard error on {n_test} test images; latency from the fastest "
                       "timing window (the estimate) to the median one. One run: seeds spread more (docs/results.md)",
                       scatter=("teachers",))
            (tmp / "README.md").write_text(bundle_readme(cfg.name, git, eng, card, data.meta, n_test, latency_model))
            files = {f: sha256(tmp / f)
                     for f in sorted({"model.onnx", eng["engine_file"], "widths.png", "pareto.png", "README.md"})}
            manifest = bundle_manifest(cfg.name, git, eng, card, slim_ckpt, sum(q.numel() for q in slimmed.parameters()),
                                       data.meta, n_test, points, latency_model, files)
            manifest["compressed_from"] = {"model": source.model, "arch": start_ckpt["arch"],
                                           "weights": start_ckpt["meta"].get("weights"),
                                           "test_acc": start_ckpt["meta"].get("test_acc")}
            check_manifest(manifest)
            write_json(tmp / "manifest.json", manifest)
            verify_bundle(tmp)
        log.info("handoff bundle %s: %s + %s, test acc %.4f, %.4f ms (budget %.4f ms)", args.out_dir,
                 "model.onnx", eng["engine_file"], eng["test_acc"], eng["latency"]["ms"], eng["budget_ms"])

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
