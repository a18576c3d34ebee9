"""The PyTorch-native engine: torch.export program, AOTInductor package checked out of process,
the fallback when that check crashes, and (on a GPU) CUDA graph replay."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import build_model
from pipeline.runtimes import COMPILED, EXPORTED, TorchEngineError, TorchEngineRunner, build_torch_engine, torch_engine


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet_tiny", num_classes=5, in_channels=1).eval()


def test_exported_program_engine_matches_the_model_at_its_batch(tmp_path: Path) -> None:
    model = _model()
    info = build_torch_engine(model, (1, 8, 8), 4, "cpu", "fp32", tmp_path, aoti=False)
    assert info["engine_file"] == EXPORTED and info["kind"] == "exported" and (tmp_path / EXPORTED).is_file()
    runner = TorchEngineRunner(tmp_path / EXPORTED, "exported", "cpu", "fp32", 4, (1, 8, 8))
    x = torch.randn(10, 1, 8, 8)  # not a multiple of the batch: the last batch is padded, then trimmed
    with torch.no_grad():
        assert torch.allclose(runner.logits(x), model(x), atol=1e-5)
    assert runner.graph_status == "not on CUDA"
    for half in ("fp16", "bf16"):
        with pytest.raises(TorchEngineError, match=f"{half} on CUDA only"):
            build_torch_engine(model, (1, 8, 8), 4, "cpu", half, tmp_path)
    with pytest.raises(TorchEngineError, match="fp32, fp16 or bf16"):
        build_torch_engine(model, (1, 8, 8), 4, "cpu", "int8", tmp_path)


@pytest.mark.slow
def test_aoti_package_is_checked_in_a_separate_process_and_used(tmp_path: Path) -> None:
    model = _model()
    info = build_torch_engine(model, (1, 8, 8), 2, "cpu", "fp32", tmp_path, aoti=True)
    if info["kind"] != "aoti":  # a machine without a C++ compiler: the fallback is the documented behaviour
        pytest.skip(f"AOTInductor unavailable here: {info['aoti']}")
    assert info["engine_file"] == COMPILED and "separate process" in info["aoti"]
    runner = TorchEngineRunner(tmp_path / COMPILED, "aoti", "cpu", "fp32", 2, (1, 8, 8))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(runner.logits(x), model(x), atol=1e-4)


def test_a_package_that_crashes_its_loader_falls_back_to_the_exported_program(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure seen on an H100 (the AOTInductor package segfaulted when called), reproduced
    with a real SIGSEGV in the check process: the stage must not die with it."""
    real_run = subprocess.run

    def crashing(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pipeline.runtimes.aoti_check", "check"]
        return real_run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], **kw)

    monkeypatch.setattr(torch_engine.subprocess, "run", crashing)
    monkeypatch.setattr("torch._inductor.aoti_compile_and_package",
                        lambda ep, package_path: Path(package_path).write_bytes(b"not a package") or package_path)
    info = build_torch_engine(_model(), (1, 8, 8), 2, "cpu", "fp32", tmp_path, aoti=True)
    assert info["kind"] == "exported" and info["engine_file"] == EXPORTED
    assert "killed by signal 11" in info["aoti"] and not (tmp_path / COMPILED).exists()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_graph_engine_replays_real_work(tmp_path: Path, precision: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: the CUDA graph replay of the torch engine cannot run here")
    model = _model()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    info = build_torch_engine(model, (1, 8, 8), 8, "cuda", precision, tmp_path, aoti=False)
    runner = TorchEngineRunner(tmp_path / info["engine_file"], info["kind"], "cuda", precision, 8, (1, 8, 8))
    assert runner.graph_status == "captured"
    # bf16 keeps 8 bits of mantissa (fp16: 11): a relative error of 2^-8 per rounding
    tol = 5e-2 if precision == "fp16" else 1.5e-1
    assert (runner.logits(x) - ref).abs().max() < tol * max(1.0, ref.abs().max().item())


@pytest.mark.gpu
def test_cuda_graph_training_step_trains_like_the_eager_step() -> None:
    """GPU issue: the whole step (forward, backward, optimiser) as a CUDA graph. The same seed,
    data and schedule, graph against eager: the same losses up to float reassociation."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: the CUDA graph training step cannot run here")
    from pipeline.config import OptimizerConfig, TrainConfig
    from pipeline.data import PreparedData, Split
    from pipeline.train import train_classifier

    g = torch.Generator().manual_seed(0)
    split = lambda n: Split(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),  # noqa: E731
                            torch.randint(0, 5, (n,), generator=g))
    data = PreparedData(split(300), split(64), split(64), {"num_classes": 5, "channels": 1, "mean": [0.5],
                                                           "std": [0.25]})
    results = {}
    for graph in (True, False):
        torch.manual_seed(0)
        cfg = TrainConfig(batch_size=32, amp=False, cuda_graph=graph, progress=False)
        results[graph] = train_classifier(build_model("resnet_tiny", num_classes=5, in_channels=1), data, cfg,
                                          OptimizerConfig(lr=0.05), epochs=3, seed=0, device=torch.device("cuda"))
    assert results[True].step_mode == "cuda graph" and results[False].step_mode == "eager"
    for a, b in zip(results[True].history, results[False].history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3, abs=1e-3)
        assert a["lr"] == pytest.approx(b["lr"])  # the schedule reaches the graph
