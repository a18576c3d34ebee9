"""``python -m pipeline.runtimes.aoti_check check PACKAGE CHECK.pt [--device D] [--precision P]``:
load a compiled AOTInductor package, run it on the saved input and compare with the saved output;
exit 0 only when it agrees. ``build_torch_engine`` runs it in a process of its own, because a
package that crashes its loader would otherwise take the stage down with it.

A module of its own, not imported by ``pipeline.runtimes``, so that ``python -m`` runs it once.
"""

from __future__ import annotations

import argparse
import sys

import torch

from pipeline.runtimes.torch_engine import TorchEngineRunner


def main(argv: list[str] | None = None) -> int:
    """Exit status of the check: 0 when the package agrees with the saved output, 3 when not."""
    p = argparse.ArgumentParser(prog="python -m pipeline.runtimes.aoti_check")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("package")
    c.add_argument("data")
    c.add_argument("--device", default="cpu")
    c.add_argument("--precision", default="fp32")
    args = p.parse_args(argv)
    data = torch.load(args.data, weights_only=True)
    runner = TorchEngineRunner(args.package, "aoti", args.device, args.precision, len(data["x"]),
                               tuple(data["x"].shape[1:]), cuda_graph=False)
    got = runner(data["x"].to(args.device)).float().cpu()
    tol = {"fp32": 1e-3, "fp16": 5e-2}.get(args.precision, 1.5e-1)  # bf16: 8 bits of mantissa
    diff = (got - data["y"]).abs().max().item()
    if not diff <= tol * max(1.0, data["y"].abs().max().item()):
        print(f"compiled package differs from the exported program by {diff:.3g}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
