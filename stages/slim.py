"""slim: remove the prune stage's masked channels for real (a smaller dense network), prove it
equals the masked network, and report parameters, FLOPs and measured latency before and after."""

from __future__ import annotations

import sys

import torch

from pipeline.checkpoint import load_model, save_checkpoint
from pipeline.config import SlimConfig, parse_section
from pipeline.data import load_prepared, normalize
from pipeline.errors import CheckpointError
from pipeline.flops import count_flops, count_params
from pipeline.io import atomic_path, write_json
from pipeline.latency import target_backend
from pipeline.slim import channel_groups, load_slimmed_model, masks_from_kept, slim
from pipeline.train import test_accuracy
from stages._common import add_precision_arg, deployed_target, load_params, log, parser, read_pruned, run


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--model", required=True, help="masked checkpoint (prune stage)")
    p.add_argument("--masks", required=True, help="masks.json (prune stage)")
    p.add_argument("--out", required=True, help="slimmed checkpoint path")
    p.add_argument("--metrics", required=True, help="metrics JSON path")
    add_precision_arg(p)
    args = p.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        cfg = parse_section(params, "slim", SlimConfig)
        target = deployed_target(params, args.precision)
        data = load_prepared(args.data)
        model, ckpt = load_model(args.model)
        if ckpt["meta"].get("data_hash") != data.meta["split_hashes"]["train"]:
            raise CheckpointError(f"{args.model} was trained on other data; re-run the prune stage")
        pruned = read_pruned(args.masks, "kept")
        kept = pruned["kept"]
        shape = (data.channels, *data.meta["image_size"])
        example = torch.zeros(1, *shape)
        masks = masks_from_kept(channel_groups(model, example), kept)
        mean, std = data.norm()
        check = normalize(data.test.take(torch.arange(min(cfg.check_samples, len(data.test)))), mean, std)
        result = slim(model, example, masks, check_inputs=check, atol=cfg.atol)  # raises when not equal

        cpu = torch.device("cpu")
        accs = {name: test_accuracy(net, data, cpu)
                for name, net in (("masked", result.masked), ("slimmed", result.model))}
        backend = target_backend(target)
        before, after = backend.measure_many([model, result.model], shape)  # interleaved: the same conditions
        flops = (count_flops(model, shape), count_flops(result.model, shape))
        nparams = (count_params(model), count_params(result.model))
        manifest = {"input_shape": list(shape), "kept": result.kept}
        with atomic_path(args.out) as tmp:  # only a checkpoint that rebuilds is moved into place
            save_checkpoint(tmp, ckpt["arch"], ckpt["arch_config"], result.model.state_dict(),
                            {**ckpt["meta"], "stage": "slim", "source": str(args.model), "test_acc": accs["slimmed"]},
                            manifest)
            load_slimmed_model(tmp)  # the manifest must rebuild exactly these weights (strict load)
        write_json(args.metrics, {
            "source": str(args.model), "budget_ms": pruned.get("budget_ms"),
            "max_abs_diff_vs_masked": result.max_abs_diff, "atol": cfg.atol,
            "params_before": nparams[0], "params_after": nparams[1],
            "flops_before": flops[0], "flops_after": flops[1],
            "latency_before_ms": before.ms, "latency_after_ms": after.ms,
            "latency_before": before.as_dict(), "latency_after": after.as_dict(),
            "latency_ratio": after.ms / before.ms, "flops_ratio": flops[1] / flops[0],
            "test_acc_masked": accs["masked"],
            "test_acc_slimmed": accs["slimmed"],
            "kept_per_group": {g: len(k) for g, k in result.kept.items()},
            "backend": target.backend, "device": backend.fingerprint()["device"],
        })
        log.info("slimmed %s: params %d -> %d, FLOPs %.3g -> %.3g, latency %.4f -> %.4f ms, "
                 "max |slim - masked| %.2e, test acc %.4f (masked %.4f)", args.model, *nparams, *flops,
                 before.ms, after.ms, result.max_abs_diff, accs["slimmed"], accs["masked"])

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
