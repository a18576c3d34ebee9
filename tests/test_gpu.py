"""The CUDA path (GPU issue): regression tests for every failure measured on an H100
(../shared/GPU.md). They skip with the reason on a machine without a GPU; `python -m benchmarks.gpu_check`
runs them where there is one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from models import build_model
from pipeline.blocks import block_masks
from pipeline.prune import SoftMaskedNet, prune_groups
from pipeline.slim import apply_masks, channel_groups, random_masks
from tests.conftest import REPO
from tests.test_stages import TINY

pytestmark = pytest.mark.gpu


def _need_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: the CUDA path cannot run here (python -m benchmarks.gpu_check runs it)")


def test_fixed_masks_on_cpu_apply_to_a_network_on_cuda() -> None:
    """H100: the closed loop crashed with tensors on cuda:0 and cpu (the hook's fixed masks)."""
    _need_gpu()
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    example = torch.zeros(1, 1, 8, 8)
    masks = {**random_masks(channel_groups(model, example), 0.4, 0.9, torch.Generator().manual_seed(0)),
             **block_masks(model, ["stages.0.1"])}
    reference = apply_masks(model, example, masks)
    net = SoftMaskedNet(model, prune_groups(model, example, depth=True))
    net.fixed = masks  # CPU tensors, as the stage holds them
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        got = net.cuda().eval()(x.cuda()).cpu()
        assert torch.allclose(got, reference(x), atol=1e-4)


def test_soft_mask_training_under_bf16_autocast_stays_finite() -> None:
    """H100: prune under bf16 autocast had a NaN loss from the first epoch."""
    _need_gpu()
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3)
    net = SoftMaskedNet(model, prune_groups(model, torch.zeros(1, 3, 16, 16), depth=True)).cuda().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        x = torch.randn(32, 3, 16, 16, device="cuda")
        y = torch.randint(0, 10, (32,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        opt.step()


@pytest.mark.slow
def test_the_pipeline_runs_on_cuda_from_prepare_to_handoff(tmp_path: Path) -> None:
    """H100: train_student crashed (teachers on cuda, inputs on CPU), prune failed (bf16 NaN, then
    the device crash), and slim..handoff were never reached. The whole pipeline, on CUDA, with
    the torch target and the PyTorch-native engine."""
    _need_gpu()
    params = json.loads(json.dumps(TINY))
    params["train"].update(device="cuda", amp=True, channels_last=True, cuda_graph=True)
    params["ensemble"]["device"] = "cuda"
    params["search"].update(device="cuda", epochs=1)
    params["target"].update(backend="torch", device="cuda", batch_size=8, precision="fp16", cuda_graph=True)
    params["prune"].update(latency_budget=0.7, epochs=2)
    params["engine"].update(backend="auto", aoti=False, on_over_budget="warn")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    work = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "stages", "--params", str(tmp_path / "params.yaml"), "--workdir",
                           str(work)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    engine = json.loads((work / "metrics" / "engine.json").read_text())
    assert engine["backend"] in ("torch", "tensorrt") and engine["device"]["type"] == "cuda"
    assert (work / "artifacts" / "handoff" / "manifest.json").is_file()
    student = json.loads((work / "metrics" / "student.json").read_text())
    assert student["step_mode"] == "cuda graph"
