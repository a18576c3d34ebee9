"""export: the slimmed model as one ONNX file (dynamic batch), checked by onnx.checker and against
PyTorch on the test split: max abs logit difference within export.atol and identical top-1, or
the stage fails and writes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import torch

from pipeline.config import ExportConfig, parse_section
from pipeline.data import Normalized, load_prepared, normalize
from pipeline.deploy import DeployError, model_card, parity
from pipeline.errors import CheckpointError
from pipeline.io import atomic_path, write_json
from pipeline.runtimes import export_onnx, ort_logits, ort_session
from pipeline.slim import load_slimmed_model
from pipeline.train import predict_logits
from stages._common import load_params, log, parser, run


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--model", required=True, help="slimmed checkpoint (slim stage)")
    p.add_argument("--out", required=True, help="ONNX path")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)

    def body() -> None:
        cfg = parse_section(load_params(args.params), "export", ExportConfig)
        data = load_prepared(args.data)
        model, ckpt = load_slimmed_model(args.model)
        if ckpt["meta"].get("data_hash") != data.meta["split_hashes"]["train"]:
            raise CheckpointError(f"{args.model} was trained on other data; re-run the pipeline")
        shape = (data.channels, *data.meta["image_size"])
        mean, std = data.norm()
        cpu = torch.device("cpu")
        reference = predict_logits(model, data.test, mean, std, cpu)
        with atomic_path(args.out) as tmp:  # moved into place only when the contract holds
            export_onnx(model, shape, tmp, opset=cfg.opset, card=model_card(data.meta))
            sess = ort_session(tmp, "cpu", threads=1, optimize=False)  # the graph as exported
            got = ort_logits(sess, Normalized(data.test, mean, std))  # batch by batch, as read
            check = parity(reference, got)
            # the dynamic batch axis really is dynamic: batch 1 and batch 7 give the same rows
            x = normalize(data.test.take(torch.arange(min(7, len(data.test)))), mean, std)
            single = torch.cat([ort_logits(sess, x[i : i + 1]) for i in range(len(x))])
            batch_diff = (single - ort_logits(sess, x)).abs().max().item()
            if not (check["max_abs_diff"] <= cfg.atol and check["top1_agreement"] == 1.0 and batch_diff <= cfg.atol):
                raise DeployError(
                    f"ONNX export contract failed on {len(reference)} test images: max abs difference "
                    f"{check['max_abs_diff']:.3g} (allowed {cfg.atol:g}), top-1 agreement {check['top1_agreement']:.4%} "
                    f"(required 100%), batch-1 vs batch-7 difference {batch_diff:.3g}")
            opset = next(o.version for o in onnx.load(str(tmp), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
        labels = data.test.y
        write_json(args.metrics, {
            "opset": opset, "max_abs_diff": check["max_abs_diff"], "atol": cfg.atol,
            "top1_agreement": check["top1_agreement"], "batch_consistency_max_abs_diff": batch_diff,
            "test_acc_onnx": (got.argmax(1) == labels).double().mean().item(),
            "test_acc_torch": (reference.argmax(1) == labels).double().mean().item(),
            "test_images": len(labels), "bytes": Path(args.out).stat().st_size,
        })
        log.info("exported %s (opset %d, %d bytes): max |onnx - torch| %.2e on %d test images, top-1 identical",
                 args.out, opset, Path(args.out).stat().st_size, check["max_abs_diff"], len(labels))

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
