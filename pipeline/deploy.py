"""Deployment: ONNX export with a parity contract, the engine (TensorRT or ONNX Runtime), latency
percentiles, and the handoff bundle's manifest and hash verification."""

from __future__ import annotations

import importlib.util
import statistics
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import SlimdeployError
from pipeline.io import file_sha256
from pipeline.latency.timing import TimedCall, TimingProtocol, measure_calls

INPUT, OUTPUT = "input", "logits"


class DeployError(SlimdeployError):
    """An export, engine or bundle that does not meet its contract."""


# --------------------------------------------------------------------------------------------
# ONNX


METADATA_KEY = "slimdeploy"


def preprocessing_spec(data_meta: dict[str, Any]) -> dict[str, Any]:
    """How an image becomes the model's input, from the prepare stage's metadata."""
    h, w = data_meta["image_size"]
    c = data_meta["channels"]
    return {"resize": [h, w], "resample": "bilinear", "channels": c,
            "channel_order": "L (grayscale)" if c == 1 else "RGB", "scale": 1 / 255,
            "mean": data_meta["mean"], "std": data_meta["std"]}


def model_card(data_meta: dict[str, Any]) -> dict[str, Any]:
    """What must travel inside the model file (covered by its hash): the class list in output
    order, the input spec and the preprocessing."""
    h, w = data_meta["image_size"]
    return {"format": "slimdeploy-model/1", "classes": list(data_meta["classes"]),
            "input": {"name": INPUT, "shape": ["batch", data_meta["channels"], h, w], "dtype": "float32",
                      "layout": "NCHW"},
            "output": {"name": OUTPUT, "shape": ["batch", len(data_meta["classes"])], "meaning": "logits"},
            "preprocessing": preprocessing_spec(data_meta)}


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, opset: int = 17,
                card: dict[str, Any] | None = None) -> None:
    """Export ``model`` (eval, fp32, CPU) to one ONNX file with a dynamic batch axis, then run
    ``onnx.checker`` on it. ``input_shape``: (C, H, W). ``card`` (``model_card``) is stored in the
    model's metadata as JSON under ``METADATA_KEY``."""
    import json

    import onnx

    model = model.eval().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, *input_shape),), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    if card is not None:
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(card, sort_keys=True)})
        onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise DeployError(f"exported ONNX model fails onnx.checker: {err}") from None


def ort_session(model: str | Path | bytes, device: str = "cpu", threads: int = 1, optimized_path: str | Path | None = None,
                optimize: bool = True) -> Any:
    """An ONNX Runtime session (full graph optimisation unless ``optimize`` is false); with
    ``optimized_path`` the optimised graph is also saved there."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeployError("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu (make gpu-runtime) "
                          "or use target.device: cpu")
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=providers)


def ort_logits(sess: Any, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits (N, K) float32 of an ONNX Runtime session on normalised inputs ``x``."""
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: x[i : i + batch_size].numpy().astype(np.float32)})[0]
           for i in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(out)).float()


def parity(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Max abs difference and top-1 agreement of two logit tensors (N, K)."""
    return {"max_abs_diff": (reference - other).abs().max().item(),
            "top1_agreement": (reference.argmax(1) == other.argmax(1)).double().mean().item()}


# --------------------------------------------------------------------------------------------
# Latency


def engine_latency(call: TimedCall, protocol: TimingProtocol) -> dict[str, Any]:
    """Latency of a deployed engine (``call`` runs one batch synchronously and returns ms), with
    the project's protocol (``pipeline.latency.timing``): ``ms`` is the estimate (fastest window
    median), ``interval_ms`` [fastest, median] window median (how much the machine moved), and
    ``p50_ms``/``p90_ms``/``p99_ms`` over every timed call."""
    t = measure_calls([call], protocol)[0]
    return {"ms": t.ms, "interval_ms": [t.ms, statistics.median(t.window_ms)], "p50_ms": t.p50_ms,
            "p90_ms": t.p90_ms, "p99_ms": t.p99_ms, "runs": t.calls, "windows": len(t.window_ms),
            "window_ms": protocol.window_s * 1e3, "span_s": protocol.min_span_s}


def budget_verdict(ms: float, budget_ms: float, noise: float) -> tuple[bool, str]:
    """(within, how): within the budget, or above it by less than the measured noise (a relative
    figure the prune stage measured by repeating the student's measurement), or over."""
    if ms <= budget_ms:
        return True, "within"
    if ms <= budget_ms * (1 + noise):
        return True, f"above by {ms / budget_ms - 1:.1%}, within the measured noise of {noise:.1%}"
    return False, f"over by {ms / budget_ms - 1:.1%} (measured noise {noise:.1%})"


# --------------------------------------------------------------------------------------------
# Engine backend selection and TensorRT


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def select_backend(requested: str, device: str) -> tuple[str, str]:
    """(backend, reason). ``auto``: TensorRT when it is installed and a GPU is the target; on a
    CUDA target without it, ONNX Runtime when it has its CUDA provider, else the PyTorch-native
    engine (``pipeline.torch_engine``); on a CPU target, ONNX Runtime. An explicit ``tensorrt``
    that cannot run is a DeployError, and so is ``torch`` on a CUDA target torch cannot see."""
    backend, reason = _select_backend(requested, device)
    if backend == "torch" and device == "cuda" and not torch.cuda.is_available():
        raise DeployError(f"engine.backend {requested} gives the torch engine for target.device cuda, but torch sees "
                          "no CUDA GPU here: run the engine stage on the GPU, or use target.device: cpu")
    return backend, reason


def _select_backend(requested: str, device: str) -> tuple[str, str]:
    if requested in ("onnxruntime", "torch"):
        return requested, "requested"
    if requested == "tensorrt":
        if not tensorrt_available():
            raise DeployError("engine.backend tensorrt needs the `tensorrt` package and a CUDA GPU (the NVIDIA PyTorch "
                              "container, see the Dockerfile); use engine.backend: auto, torch or onnxruntime here")
        return "tensorrt", "requested"
    if tensorrt_available() and device == "cuda":
        return "tensorrt", "auto: tensorrt installed and a CUDA GPU present"
    why = "tensorrt not installed" if importlib.util.find_spec("tensorrt") is None else "no CUDA GPU / target.device cpu"
    if device == "cuda":
        if ort_has_cuda():
            return "onnxruntime", f"auto: {why}; onnxruntime has its CUDA provider"
        return "torch", f"auto: {why}, onnxruntime has no CUDA provider: PyTorch-native engine"
    return "onnxruntime", f"auto: {why}"


def build_tensorrt_engine(onnx_path: str | Path, plan_path: str | Path, input_shape: tuple[int, ...],
                          batch: tuple[int, int, int], precision: str, timing_cache: str | Path,
                          calibration: np.ndarray | None = None, calibration_cache: str | Path | None = None) -> None:
    """Build and serialize a TensorRT engine from ONNX (TensorRT Python API).

    ``batch``: (min, opt, max) of the optimisation profile. ``precision``: fp32 | fp16 | int8
    (int8 needs ``calibration`` images, normalised NCHW float32; entropy calibrator, cache
    written to ``calibration_cache``). The timing cache is read if present and written back."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        raise DeployError("TensorRT cannot parse the ONNX model: "
                          + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    cache_bytes = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, *[(b, *input_shape) for b in batch])
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if calibration is None or calibration_cache is None:
            raise DeployError("int8 needs calibration images and a calibration cache path")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(profile)
        config.int8_calibrator = _entropy_calibrator(trt, calibration, batch[1], calibration_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DeployError("TensorRT failed to build the engine (see its log)")
    Path(plan_path).write_bytes(bytes(plan))
    Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))


def _entropy_calibrator(trt: Any, images: np.ndarray, batch: int, cache_path: str | Path) -> Any:
    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.data = torch.from_numpy(images.astype(np.float32))
            self.index = 0
            self.device_batch = torch.empty((batch, *images.shape[1:]), device="cuda")

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index + batch > len(self.data):
                return None
            self.device_batch.copy_(self.data[self.index : self.index + batch])
            self.index += batch
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            p = Path(cache_path)
            return p.read_bytes() if p.is_file() else None

        def write_calibration_cache(self, cache: bytes) -> None:
            Path(cache_path).write_bytes(bytes(cache))

    return Calibrator()


class TensorRTRunner:
    """Runs a serialized engine on CUDA tensors (fixed batch per call, within the profile)."""

    def __init__(self, plan_path: str | Path) -> None:
        import tensorrt as trt

        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise DeployError(f"TensorRT cannot deserialize {plan_path}")
        self.ctx = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to("cuda", torch.float32).contiguous()
        self.ctx.set_input_shape(INPUT, tuple(x.shape))
        y = torch.empty(tuple(self.ctx.get_tensor_shape(OUTPUT)), device="cuda", dtype=torch.float32)
        self.ctx.set_tensor_address(INPUT, x.data_ptr())
        self.ctx.set_tensor_address(OUTPUT, y.data_ptr())
        self.ctx.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return y

    def logits(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.cat([self(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)])


# --------------------------------------------------------------------------------------------
# Bundle


sha256 = file_sha256  # the bundle's hashes


MANIFEST_KEYS = ("format", "model", "engine", "input", "output", "preprocessing", "classes", "accuracy", "latency",
                 "budget", "device", "versions", "git_revision", "files")


def check_manifest(manifest: dict[str, Any]) -> None:
    """Refuse a manifest missing a required key or with malformed input/preprocessing/files."""
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise DeployError(f"manifest.json lacks {missing}")
    inp, pre = manifest["input"], manifest["preprocessing"]
    for key in ("name", "shape", "dtype", "layout"):
        if key not in inp:
            raise DeployError(f"manifest.json input lacks {key!r}")
    for key in ("resize", "mean", "std", "channels", "channel_order", "scale"):
        if key not in pre:
            raise DeployError(f"manifest.json preprocessing lacks {key!r}")
    if len(pre["mean"]) != pre["channels"] or len(pre["std"]) != pre["channels"]:
        raise DeployError("manifest.json preprocessing: mean/std must have one value per channel")
    if not isinstance(manifest["files"], dict) or not manifest["files"]:
        raise DeployError("manifest.json files must map file names to sha256")


def read_model_card(onnx_path: str | Path) -> dict[str, Any]:
    """The card ``export_onnx`` stored in an ONNX model, or a DeployError naming the file."""
    import json

    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, ValueError, DecodeError) as err:
        raise DeployError(f"{onnx_path} is not a readable ONNX model: {type(err).__name__}: {err}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise DeployError(f"{onnx_path} carries no {METADATA_KEY!r} metadata: it was not exported by this pipeline "
                          "(or by an older version); its class list and input cannot be checked")
    try:
        card = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise DeployError(f"{onnx_path}: its {METADATA_KEY!r} metadata is not valid JSON: {err}") from None
    graph_in = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    card["_graph"] = {"inputs": {i.name: dims(i) for i in graph_in}, "outputs": {o.name: dims(o) for o in proto.graph.output}}
    return card


def check_model_matches_manifest(manifest: dict[str, Any], card: dict[str, Any], what: str) -> None:
    """Refuse a manifest whose classes, input or preprocessing disagree with the model file's own
    card, or a card that disagrees with the model's graph: every difference is named."""
    problems = []
    if manifest["classes"] != card.get("classes"):
        m, c = manifest["classes"], card.get("classes") or []
        how = ("the same names in another order" if sorted(m) == sorted(c) else
               f"{len(m)} classes in the manifest, {len(c)} in the model" if len(m) != len(c) else "different names")
        problems.append(f"classes: {how} (manifest {m[:6]}{'...' if len(m) > 6 else ''}, model {c[:6]}"
                        f"{'...' if len(c) > 6 else ''})")
    for key in ("input", "preprocessing"):
        mine, theirs = manifest.get(key), card.get(key)
        if key == "input":
            mine = {k: mine.get(k) for k in ("name", "shape", "dtype", "layout")} if isinstance(mine, dict) else mine
            theirs = {k: theirs.get(k) for k in ("name", "shape", "dtype", "layout")} if isinstance(theirs, dict) else theirs
        if mine != theirs:
            problems.append(f"{key}: manifest {mine}, model {theirs}")
    graph = card.get("_graph", {})
    inp = card.get("input", {})
    if inp.get("name") not in graph.get("inputs", {}):
        problems.append(f"the model's graph has no input {inp.get('name')!r} (it has {sorted(graph.get('inputs', {}))})")
    else:
        shape = graph["inputs"][inp["name"]]
        if [d for d in shape[1:]] != list(inp["shape"][1:]):
            problems.append(f"the model's input {inp['name']} is {shape}, its card says {inp['shape']}")
    outs = graph.get("outputs", {})
    k = len(card.get("classes") or [])
    if len(outs) != 1 or next(iter(outs.values()), [None, None])[-1] != k:
        problems.append(f"the model's outputs {outs} do not give one score per class ({k} classes)")
    if problems:
        raise DeployError(f"{what}: the manifest and the model disagree; refusing to predict:\n  " + "\n  ".join(problems))


def verify_bundle(bundle: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` and check every listed file's sha256; a missing or altered file is
    a DeployError naming it. Returns the manifest."""
    import json

    bundle = Path(bundle)
    mpath = bundle / "manifest.json"
    if not mpath.is_file():
        raise DeployError(f"{bundle} is not a handoff bundle: manifest.json is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise DeployError(f"{mpath} is not valid JSON: {err}") from None
    check_manifest(manifest)
    for name, digest in manifest["files"].items():
        f = bundle / name
        if not f.is_file():
            raise DeployError(f"bundle file {name} listed in manifest.json is missing from {bundle}")
        if sha256(f) != digest:
            raise DeployError(f"bundle file {name} does not match its sha256 in manifest.json (altered or corrupted)")
    onnx_name = manifest["model"].get("onnx") if isinstance(manifest.get("model"), dict) else None
    if onnx_name not in manifest["files"]:
        raise DeployError(f"manifest.json model.onnx ({onnx_name!r}) is not one of its hashed files")
    check_model_matches_manifest(manifest, read_model_card(bundle / onnx_name), f"bundle {bundle}")
    return manifest
