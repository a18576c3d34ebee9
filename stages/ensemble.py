"""ensemble: evaluate every teacher, their ensemble (mean of softmax) and its oracle on test."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline.checkpoint import load_model
from pipeline.config import EnsembleConfig, parse_section, parse_teachers
from pipeline.data import load_prepared
from pipeline.ensemble import confusion_matrix, ensemble_probs, ensemble_report
from pipeline.errors import CheckpointError
from pipeline.io import write_csv, write_json
from pipeline.plots import confusion_png
from pipeline.runtime import resolve_device
from pipeline.train import predict_logits
from stages._common import load_params, log, parser, run


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--teachers", required=True, help="directory holding <name>.pt per teacher")
    p.add_argument("--metrics", required=True, help="metrics JSON path")
    p.add_argument("--plots-dir", required=True, help="directory for confusion.csv and confusion.png")
    args = p.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        cfg = parse_section(params, "ensemble", EnsembleConfig)
        names = list(parse_teachers(params))
        device = resolve_device(cfg.device)
        data = load_prepared(args.data)
        mean, std = data.norm()
        logits = []
        for name in names:
            model, ckpt = load_model(Path(args.teachers) / f"{name}.pt")
            if ckpt["meta"].get("data_hash") != data.meta["split_hashes"]["train"]:
                raise CheckpointError(f"teacher {name} was trained on other data than {args.data}; re-run it")
            logits.append(predict_logits(model.to(device), data.test, mean, std, device, cfg.batch_size))
        stacked = torch.stack(logits)
        report = ensemble_report(stacked, data.test.y, names, data.meta["classes"])
        classes = data.meta["classes"]
        preds = ensemble_probs(stacked).argmax(-1)
        plots = Path(args.plots_dir)
        write_csv(plots / "confusion.csv", [
            {"actual": classes[a], "predicted": classes[b]} for a, b in zip(data.test.y.tolist(), preds.tolist())
        ])
        cm = confusion_matrix(data.test.y, preds, data.num_classes)
        confusion_png(cm, classes, plots / "confusion.png",
                      f"ensemble of {len(names)} on test: {report['ensemble_acc']:.2%}")
        write_json(args.metrics, report)
        log.info("members %s | ensemble %.4f | oracle %.4f | all right %.4f | none right %.4f",
                 {k: round(v, 4) for k, v in report["members"].items()}, report["ensemble_acc"],
                 report["oracle_acc"], report["all_right"], report["none_right"])

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
