"""Deployment logic that is not a runtime: the preprocessing spec and model card, the engine
backend's selection, output parity, engine latency percentiles, and the handoff bundle's manifest
and hash verification. The runtimes themselves (ONNX export, ONNX Runtime, TensorRT, the torch
engine) live in ``pipeline.runtimes``."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import SlimdeployError
from pipeline.images import DECODE_ID, DECODE_RULE, DEFAULT_MAX_PIXELS
from pipeline.io import file_sha256
from pipeline.latency.timing import TimedCall, TimingProtocol, measure_calls
from pipeline.runtimes import INPUT, METADATA_KEY, OUTPUT, ort_has_cuda, tensorrt_available


class DeployError(SlimdeployError):
    """An export, engine or bundle that does not meet its contract."""


# --------------------------------------------------------------------------------------------
# Model card and output parity


def preprocessing_spec(data_meta: dict[str, Any]) -> dict[str, Any]:
    """How an image becomes the model's input, from the prepare stage's metadata: ``decode`` is the
    rule of ``pipeline.images`` (every Pillow mode to 8 bits), ``max_image_pixels`` the largest
    image ``pipeline.predict`` decodes unless told otherwise (``prepare.max_image_pixels``)."""
    h, w = data_meta["image_size"]
    c = data_meta["channels"]
    crop = ({"shorter_side": int(data_meta["shorter_side"])}  # prepare.storage files: resize, then centre crop
            if data_meta.get("shorter_side") else {})
    return {"decode": data_meta.get("decode", DECODE_RULE),
            "max_image_pixels": data_meta.get("max_image_pixels", DEFAULT_MAX_PIXELS),
            **crop, "resize": [h, w], "resample": "bilinear", "channels": c,
            "channel_order": "L (grayscale)" if c == 1 else "RGB", "scale": 1 / 255,
            "mean": list(data_meta["mean"]), "std": list(data_meta["std"])}  # copies, never the caller's lists


def model_card(data_meta: dict[str, Any]) -> dict[str, Any]:
    """What must travel inside the model file (covered by its hash): the class list in output
    order, the input spec and the preprocessing."""
    h, w = data_meta["image_size"]
    return {"format": "slimdeploy-model/1", "classes": list(data_meta["classes"]),
            "input": {"name": INPUT, "shape": ["batch", data_meta["channels"], h, w], "dtype": "float32",
                      "layout": "NCHW"},
            "output": {"name": OUTPUT, "shape": ["batch", len(data_meta["classes"])], "meaning": "logits"},
            "preprocessing": preprocessing_spec(data_meta)}


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


# --------------------------------------------------------------------------------------------
# Engine backend selection


def select_backend(requested: str, device: str) -> tuple[str, str]:
    """(backend, reason). ``auto``: TensorRT when it is installed and a GPU is the target; on a
    CUDA target without it, ONNX Runtime when it has its CUDA provider, else the PyTorch-native
    engine (``pipeline.runtimes.torch_engine``); on a CPU target, ONNX Runtime. An explicit
    ``tensorrt`` that cannot run is a DeployError, and so is ``torch`` on a CUDA target torch
    cannot see."""
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


# --------------------------------------------------------------------------------------------
# Bundle


sha256 = file_sha256  # the bundle's hashes


MANIFEST_KEYS = ("format", "model", "engine", "input", "output", "preprocessing", "classes", "accuracy", "latency",
                 "budget", "device", "versions", "git_revision", "files")


class _Part(BaseModel):
    # strict: JSON types as written (no "3" for 3, no true for 1), finite numbers; keys this
    # predictor does not read are kept (newer bundles may add some), except in preprocessing
    model_config = ConfigDict(strict=True, frozen=True, allow_inf_nan=False, extra="allow")


class ModelSpec(_Part):
    onnx: str


class InputSpec(_Part):
    name: str
    shape: list[str | int] = Field(min_length=4, max_length=4, description="[batch, C, H, W]")
    dtype: str
    layout: str


class Preprocessing(_Part):
    """How an image becomes the input (``preprocessing_spec``); every key is applied, so an unknown
    one is refused rather than ignored."""

    model_config = ConfigDict(extra="forbid")
    decode: str | None = Field(None, description="pipeline.images.DECODE_RULE; absent in bundles made before it")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    shorter_side: int | None = Field(
        None, ge=1, le=65536, description="when set: resize the shorter side to this (bilinear, antialiased), then "
        "crop the centre resize[0] x resize[1] (pipeline.streaming.eval_view); absent: resize straight to resize")
    resize: list[Annotated[int, Field(ge=1, le=65536)]] = Field(min_length=2, max_length=2)
    resample: str
    channels: int
    channel_order: str
    scale: float = Field(gt=0)
    mean: list[float]
    std: list[Annotated[float, Field(gt=0)]]

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: int) -> int:
        if v not in (1, 3):
            raise ValueError(f"must be 1 or 3, got {v}")
        return v

    @field_validator("decode")
    @classmethod
    def _known_rule(cls, v: str | None) -> str | None:
        if v is not None and v.split(":", 1)[0] != DECODE_ID:
            raise ValueError(f"this predictor decodes images by {DECODE_ID}; the bundle asks for {v[:60]!r}")
        return v

    @model_validator(mode="after")
    def _per_channel(self) -> Preprocessing:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std must have one value per channel ({self.channels}); "
                             f"got {len(self.mean)} and {len(self.std)}")
        return self


class Manifest(_Part):
    """A handoff bundle's manifest.json as ``pipeline.predict`` reads it."""

    format: str
    model: ModelSpec
    engine: dict[str, Any]
    input: InputSpec
    output: dict[str, Any]
    preprocessing: Preprocessing
    classes: list[str] = Field(min_length=1)
    accuracy: dict[str, Any]
    latency: dict[str, Any]
    budget: dict[str, Any]
    device: dict[str, Any]
    versions: dict[str, Any]
    git_revision: str
    files: dict[str, str] = Field(min_length=1, description="file name in the bundle -> sha256")

    @model_validator(mode="after")
    def _input_takes_the_preprocessed_image(self) -> Manifest:
        c, h, w = self.input.shape[1:]
        pre = self.preprocessing
        if [c, h, w] != [pre.channels, *pre.resize]:
            raise ValueError(f"preprocessing gives {pre.channels} x {pre.resize[0]} x {pre.resize[1]} images, but "
                             f"input.shape is {self.input.shape}")
        return self

    @field_validator("files")
    @classmethod
    def _inside_the_bundle(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            parts = Path(name).parts
            if not name or Path(name).is_absolute() or ".." in parts or "\\" in name or "\0" in name:
                raise ValueError(f"{name!r} is not a file name inside the bundle")
        return v


class _Card(_Part):
    """What ``check_model_matches_manifest`` reads of a model card (``model_card``)."""

    classes: list[str]
    input: InputSpec
    output: dict[str, Any]
    preprocessing: dict[str, Any]


def _problem(e: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "missing":
        *parent, key = e["loc"]
        return f"lacks {[key]}" if not parent else f"{'.'.join(map(str, parent))} lacks {key!r}"
    got = repr(e.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return f"{loc or '(top level)'}: {e['msg'].removeprefix('Value error, ')} (got {got})"


def check_manifest(manifest: Any) -> Manifest:
    """``manifest`` (parsed JSON, any value) as a typed Manifest, or a DeployError naming every
    field that is missing, of the wrong type or out of range."""
    if not isinstance(manifest, dict):
        raise DeployError(f"manifest.json must be a JSON object with the fields {', '.join(MANIFEST_KEYS)}; "
                          f"got {type(manifest).__name__} {str(json.dumps(manifest))[:60]}")
    try:
        return Manifest.model_validate(manifest)
    except ValidationError as err:
        problems = [_problem(e) for e in err.errors()]
        missing = [p for p in problems if p.startswith("lacks [")]
        if missing:  # the top-level keys, in one list
            keys = [p[len("lacks ["):-1].strip("'") for p in missing]
            problems = [f"lacks {keys}"] + [p for p in problems if p not in missing]
        raise DeployError("manifest.json " + "; ".join(problems[:8])) from None


def read_model_card(onnx_path: str | Path) -> dict[str, Any]:
    """The card ``pipeline.runtimes.export_onnx`` stored in an ONNX model, or a DeployError naming the file."""
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
        _Card.model_validate(card)
    except json.JSONDecodeError as err:
        raise DeployError(f"{onnx_path}: its {METADATA_KEY!r} metadata is not valid JSON: {err}") from None
    except ValidationError as err:
        raise DeployError(f"{onnx_path}: its {METADATA_KEY!r} metadata is not a model card: "
                          + "; ".join(_problem(e) for e in err.errors()[:4])) from None
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
    if len(outs) != 1 or (next(iter(outs.values())) or [None])[-1] != k:
        problems.append(f"the model's outputs {outs} do not give one score per class ({k} classes)")
    if problems:
        raise DeployError(f"{what}: the manifest and the model disagree; refusing to predict:\n  " + "\n  ".join(problems))


def _read_manifest_json(bundle: Path) -> Any:
    mpath = bundle / "manifest.json"
    if not mpath.is_file():
        raise DeployError(f"{bundle} is not a handoff bundle: manifest.json is missing")
    try:
        return json.loads(mpath.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DeployError(f"{mpath} is not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise DeployError(f"{mpath} is not valid JSON: {err}") from None
    except RecursionError:
        raise DeployError(f"{mpath} is nested too deeply to be a manifest") from None
    except OSError as err:
        raise DeployError(f"cannot read {mpath}: {err}") from None


def verify_bundle(bundle: str | Path) -> dict[str, Any]:
    """Read ``manifest.json``, check it against the schema (``check_manifest``), check every listed
    file's sha256 and the model's own card; a malformed field, a missing or altered file is a
    DeployError naming it. Returns the manifest as parsed (``check_manifest`` gives it typed)."""
    bundle = Path(bundle)
    manifest = _read_manifest_json(bundle)
    spec = check_manifest(manifest)
    for name, digest in spec.files.items():
        f = bundle / name
        if not f.is_file():
            raise DeployError(f"bundle file {name} listed in manifest.json is missing from {bundle}")
        if sha256(f) != digest:
            raise DeployError(f"bundle file {name} does not match its sha256 in manifest.json (altered or corrupted)")
    if spec.model.onnx not in spec.files:
        raise DeployError(f"manifest.json model.onnx ({spec.model.onnx!r}) is not one of its hashed files")
    check_model_matches_manifest(manifest, read_model_card(bundle / spec.model.onnx), f"bundle {bundle}")
    return manifest
