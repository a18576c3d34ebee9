"""precision: the precision the target deploys in. ``target.precision`` fp32, fp16 or int8 is
written through as it is; ``auto`` is chosen here, on the trained network to be compressed, before
the latency table is measured (``pipeline.precision``): int8 when its validation accuracy is within
``engine.max_accuracy_drop`` of fp32 and it measures faster on the target, else fp32. Every later
stage that measures or deploys reads the choice from this stage's output."""

from __future__ import annotations

import sys

from pipeline.checkpoint import load_student
from pipeline.config import EngineConfig, TargetConfig, parse_section
from pipeline.data import load_prepared
from pipeline.errors import ConfigError
from pipeline.io import file_sha256, write_json
from pipeline.precision import CHOICE_KEYS, decide, evidence, record
from stages._common import load_params, log, parser, run

READINGS = 5  # paired readings of fp32 against int8: the choice is the median ratio's


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data directory (the validation split)")
    p.add_argument("--student", required=True, help="checkpoint of the network to compress (compress.model's .pt)")
    p.add_argument("--out", required=True, help="the choice: JSON with requested and precision")
    p.add_argument("--metrics", required=True, help="metrics JSON path (the evidence of an auto choice)")
    args = p.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        target = parse_section(params, "target", TargetConfig)
        if target.precision != "auto":
            chosen, why, ev = target.precision, "target.precision", None
        else:
            engine = parse_section(params, "engine", EngineConfig)
            data = load_prepared(args.data)
            if len(data.val) == 0:
                raise ConfigError("target.precision auto chooses by the accuracy on the validation split, which is "
                                  "empty: set prepare.val_fraction above 0 (or give the image folder a val/ split), "
                                  "or set target.precision to fp32 or int8")
            model, _ = load_student(args.student, data.meta)
            ev = evidence(model.eval(), data, target, engine, READINGS)
            chosen, why = decide(ev)
        log.info("precision %s (target.precision %s): %s", chosen, target.precision, why)
        out: dict = {"requested": target.precision, "precision": chosen}
        if ev is not None:  # measured: on this model, under these target settings
            out.update(target={k: getattr(target, k) for k in CHOICE_KEYS}, model_sha256=file_sha256(args.student))
        write_json(args.metrics, record(target.precision, chosen, why, ev))
        write_json(args.out, out)  # last: only a finished choice is an output

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
