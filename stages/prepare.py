"""prepare: read the data source, split it, measure mean/std; write the splits and meta.json."""

from __future__ import annotations

import sys

from pipeline.config import PrepareConfig, parse_section
from pipeline.data import load_source, prepare_files, prepare_splits, save_prepared
from pipeline.io import write_json
from stages._common import load_params, log, parser, run


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="directory for train/val/test .npz and meta.json")
    p.add_argument("--metrics", required=True, help="metrics JSON path")
    args = p.parse_args(argv)

    def body() -> None:
        cfg = parse_section(load_params(args.params), "prepare", PrepareConfig)
        if cfg.storage == "files":
            splits, meta = prepare_files(cfg)
        else:
            splits, meta = prepare_splits(load_source(cfg), cfg)
        save_prepared(args.out, splits, meta)
        write_json(
            args.metrics,
            {
                "source": cfg.source,
                "num_classes": meta["num_classes"],
                "image_size": meta["image_size"],
                "channels": meta["channels"],
                "storage": cfg.storage,
                **{f"{k}_images": v for k, v in meta["split_sizes"].items()},
                "skipped_corrupt": len(meta["skipped_corrupt"]),
            },
        )
        log.info("prepared %s: %s, %d classes, %s px", cfg.source, meta["split_sizes"],
                 meta["num_classes"], "x".join(map(str, meta["image_size"])))

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
