"""Typed, frozen configs, one per params.yaml section. Unknown keys, wrong types and
out-of-range values are rejected before any work, with the offending key named."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config_models import ModelEntry
from pipeline.errors import ConfigError
from pipeline.images import DEFAULT_MAX_PIXELS

T = TypeVar("T", bound=BaseModel)

Device = Literal["auto", "cpu", "cuda"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepareConfig(Section):
    """`prepare`: where images come from and how they are split."""

    source: Literal["digits", "imagefolder", "cifar10", "cifar100"] = Field(
        "digits", description="digits: scikit-learn's embedded 8x8 digits; imagefolder: "
        "root/train/<class>/* (+ optional root/test/<class>/*); cifar10/cifar100: torchvision"
    )
    root: str = Field("data", description="imagefolder: directory or .tar/.tar.gz; cifar: dataset root")
    image_size: int | None = Field(16, ge=4, le=1024, description="resize to this square size; null keeps the source size")
    channels: Literal[1, 3] | None = Field(None, description="1 (grey) or 3 (RGB); null: the source's own")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5, description="of train, per class")
    test_fraction: float = Field(0.15, gt=0.0, lt=0.5, description="of train, per class, when the source has no test split")
    seed: int = Field(0, ge=0, description="seed of the stratified split")
    max_per_class: int | None = Field(None, ge=2, description="cap on training-pool images per class (reduced runs)")
    skip_corrupt: bool = Field(False, description="skip unreadable images (counted in metrics) instead of failing")
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, le=2**40, description="imagefolder: images with more pixels (width x height) are "
        "refused before decoding (default: Pillow's own limit); raise it for genuine large images"
    )
    download: bool = Field(False, description="cifar10/cifar100: download into root when missing")


class OptimizerConfig(Section):
    """SGD with momentum and a per-step learning-rate schedule."""

    lr: float = Field(0.1, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    milestones: tuple[float, ...] = Field((0.5, 0.75), description="multistep: fractions of training")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="multistep: lr factor at each milestone")

    @field_validator("milestones")
    @classmethod
    def _milestones_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 < m < 1.0 for m in v) or list(v) != sorted(v):
            raise ValueError("milestones must be increasing fractions in (0, 1)")
        return v


class TrainConfig(Section):
    """`train`: settings shared by every training stage (teachers now, the student later)."""

    device: Device = "auto"
    batch_size: int = Field(64, ge=1, le=65536, description="global batch (split across DDP ranks)")
    eval_batch_size: int = Field(512, ge=1, le=65536)
    augment: Literal["none", "padcrop_flip"] = Field("none", description="padcrop_flip for natural 32x32 images")
    crop_padding: int = Field(4, ge=0, le=64)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA (ignored on CPU)")
    num_threads: int | None = Field(None, ge=1, le=256, description="CPU threads for torch; null: torch's default")
    cuda_graph: bool = Field(True, description="on one CUDA device: capture the training step (forward, backward, "
                             "optimiser) in a CUDA graph and replay it; eager on CPU, under DDP, or when capture fails")
    progress: bool = Field(True, description="show progress bars")


class TeacherConfig(ModelEntry):
    """One entry of `teachers`: a model (``arch``, ``arch_config``, optional ``weights``: see
    ``pipeline.config_models.ModelEntry``) and how to train it. With ``weights`` the teacher
    fine-tunes from them for ``epochs`` epochs; ``epochs: 0`` uses them as they are (evaluated,
    checked above chance, saved)."""

    seed: int = Field(0, ge=0)
    epochs: int = Field(ge=0, le=100000, description="training epochs; 0: no training, use `weights` as they are")
    optimizer: OptimizerConfig = OptimizerConfig()

    @model_validator(mode="after")
    def _warmup_shorter_than_training(self) -> TeacherConfig:
        if self.epochs == 0 and self.weights is None:
            raise ValueError("epochs: 0 uses the weights as they are, so it needs weights (a file in weights/ or a "
                             "torchvision weights name); without them give epochs >= 1")
        if self.epochs > 0 and self.optimizer.warmup_epochs >= self.epochs:
            raise ValueError(
                f"optimizer.warmup_epochs ({self.optimizer.warmup_epochs}) must be < epochs ({self.epochs})"
            )
        return self


class EnsembleConfig(Section):
    """`ensemble`: evaluation of the teachers on the test split."""

    device: Device = "auto"
    batch_size: int = Field(512, ge=1, le=65536)


class TimingConfig(Section):
    """`target.timing`: how every latency is measured (pipeline/latency/timing.py): each model is
    timed in `passes` windows of `window_ms`, interleaved with the other models measured with it
    and spread over at least `span_s` seconds; the estimate is the fastest window's median."""

    passes: int = Field(10, ge=1, le=1000, description="windows per model")
    window_ms: float = Field(5.0, gt=0.0, le=10000.0, description="milliseconds of timed calls per window")
    span_s: float = Field(0.5, ge=0.0, le=600.0, description="least wall time the windows of a few models spread over")


class TargetConfig(Section):
    """`target`: the deployment runtime and device latency is measured on (profile, prune, engine)."""

    backend: Literal["onnxruntime", "torch", "tensorrt"] = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int = Field(1, ge=1, le=4096, description="deployment batch size")
    precision: Literal["fp32", "fp16"] = "fp32"
    threads: int = Field(1, ge=1, le=256, description="CPU threads of the runtime")
    cuda_graph: bool = Field(False, description="torch backend on CUDA: replay a CUDA graph")
    channel_step: int | None = Field(None, ge=1, le=512, description="channel step of the latency table and of "
                                     "pruning; null: detect it on the staircase probe (profile)")
    timing: TimingConfig = TimingConfig()


class ProfileConfig(Section):
    """`profile`: the latency lookup table of the network to be pruned, its channel step and its
    calibration on measured sub-networks."""

    arch: str = Field("student", description="'student' (the searched architecture) or a registry architecture")
    arch_config: dict[str, Any] = Field(default_factory=dict)
    min_fraction: float = Field(0.25, gt=0.0, le=1.0, description="smallest width, as a fraction of the full width")
    max_points: int = Field(6, ge=2, le=64, description="grid values per channel axis of each unit (sampled "
                            "evenly from the lattice, ends included)")
    staircase_channels: int = Field(64, ge=4, le=4096, description="output counts 1..N of the step probe")
    staircase_repeats: int = Field(3, ge=1, le=20, description="independent measurements of the step probe; "
                                   "a step they disagree on is not used")
    staircase_passes: int = Field(4, ge=1, le=1000, description="timing windows per probe point and repeat")
    fit_samples: int = Field(40, ge=3, le=10000, description="random sub-networks the calibration is fitted on")
    heldout_samples: int = Field(40, ge=3, le=10000, description="disjoint random sub-networks the error is "
                                 "measured on")
    seed: int = Field(0, ge=0, description="seed of the random sub-networks")
    warn_mape: float = Field(0.10, gt=0.0, le=10.0, description="warn when the held-out error is above this")
    max_mape: float | None = Field(None, gt=0.0, le=10.0, description="opt-in: fail the stage when the held-out "
                                   "error is above this; null: never (the prune stage measures the real network)")
    progress: bool = True

    @field_validator("arch")
    @classmethod
    def _arch_known(cls, v: str) -> str:
        from models.registry import is_known, unknown_arch_message

        if v != "student" and not is_known(v):
            raise ValueError(unknown_arch_message(v) + ", or 'student'")
        return v


class SlimConfig(Section):
    """`slim`: turn the prune stage's masks into a smaller dense network, verified equal to the
    masked one."""

    atol: float = Field(1e-4, gt=0.0, le=1.0, description="max abs output difference slimmed vs masked (fp32)")
    check_samples: int = Field(64, ge=1, le=100000, description="test images in the equivalence check")


PRUNE_OPTIMIZER = OptimizerConfig(lr=0.05, warmup_epochs=0)


class PruneConfig(Section):
    """`prune`: channel and block pruning of the student under a latency budget on the target: Taylor
    importance (``method: taylor``, the default) or SCP soft masks (``method: scp``), widths on the
    latency table, a closed loop on the target (``pipeline.prune``). The budget it derives
    (``pipeline.prune.Budget``) is the one every later stage judges against."""

    latency_budget: float = Field(0.5, gt=0.0, description="budget: a fraction of the student's measured "
                                  "latency (budget_unit: fraction) or milliseconds (budget_unit: ms)")
    budget_unit: Literal["fraction", "ms"] = "fraction"
    epochs: int = Field(15, ge=1, le=100000, description="training epochs in all (scp: soft masks, then "
                        "settling; taylor: every epoch settles the decided network)")
    method: Literal["scp", "taylor"] = Field("taylor", description="how channels and blocks are ranked: scp = SCP soft "
                                            "masks trained for the first (1 - settle_fraction) of the epochs; taylor = "
                                            "first-order Taylor importance of the student (HALP), no search epochs")
    settle_fraction: float = Field(0.75, ge=0.0, lt=1.0, description="scp: last fraction of the epochs training the "
                                   "decided network (masks fixed); the rest searches the masks; 0: pure SCP")
    taylor_batches: int = Field(32, ge=1, le=100000, description="taylor: training batches the importance is "
                                "averaged over (at most one epoch's)")
    taylor_per_sample: bool = Field(False, description="taylor: average each sample's squared gradient (empirical "
                                    "Fisher) instead of each batch's squared mean gradient (HALP)")
    taylor_normalize: Literal["none", "group", "sqrt"] = Field("none", description="taylor: group = each channel "
                                                               "group's importance over its mean (blocks over the mean "
                                                               "of the groups inside them); sqrt = its square root, "
                                                               "the gradient's RMS; none = the raw (dL/dm)^2")
    allocation: Literal["knapsack", "threshold"] = Field("knapsack", description="how widths are decided after the "
                                                         "mask search: knapsack = least importance lost per ms saved "
                                                         "(latency table); threshold = channels with keep > 0.5")
    depth: bool = Field(True, description="also remove whole residual blocks (those with an identity shortcut): "
                        "a learned keep gate per block, priced from the latency table")
    channels: bool = Field(True, description="narrow channel groups; false: only remove whole blocks (needs depth: "
                           "true and method: taylor), every layer kept at the student's width")
    optimizer: OptimizerConfig = PRUNE_OPTIMIZER
    seed: int = Field(0, ge=0)
    coupled: Literal["gate", "keep"] = Field("gate", description="groups without BatchNorm+ReLU (residual "
                                             "streams): gate = learnable keep logits, keep = full width")
    eps: float = Field(0.05, ge=0.0, le=1.0, description="SCP: a channel is off when BN output < eps")
    sharpness: float = Field(20.0, gt=0.0, le=1000.0, description="SCP: k in pi = sigmoid(k (q - c0))")
    threshold: float = Field(0.95, gt=0.0, lt=1.0, description="SCP: c0 in pi = sigmoid(k (q - c0))")
    mask_tau: float = Field(0.5, gt=0.0, le=10.0, description="Gumbel-softmax temperature of the soft masks")
    gate_init: float = Field(0.95, gt=0.5, lt=1.0, description="initial keep probability of gated channels")
    dual_lr: float = Field(10.0, gt=0.0, le=10000.0, description="budget multiplier's rise per epoch of relative "
                           "excess (dual ascent, divided over the epoch's steps)")
    sparsity: float = Field(0.0, ge=0.0, le=1.0, description="optional SCP regulariser weight (lambda)")
    multiple: int | None = Field(None, ge=1, le=512, description="kept widths in multiples of this; null: the "
                                 "latency table's measured step")
    band: tuple[float, float] = Field((0.9, 1.0), description="closed loop stops when measured / budget is in it, "
                                      "its top lowered by the measured noise (compare matches baselines to it)")
    aim: float = Field(0.5, ge=0.0, le=1.0, description="where in the band training and the width allocation aim: "
                       "0 its bottom, 0.5 its middle, 1 its top (lowered by the measured noise)")
    max_iterations: int = Field(20, ge=1, le=1000, description="closed loop: measurements at most")
    loop_val_samples: int = Field(1000, ge=1, le=1000000, description="validation images scoring loop steps")
    finetune_epochs: int = Field(0, ge=0, le=100000, description="optional recovery fine-tune after hardening")
    progress: bool = True

    @field_validator("band")
    @classmethod
    def _band(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] < v[1] <= 1.0:
            raise ValueError("band must be [low, high] with 0 < low < high <= 1")
        return v

    @model_validator(mode="after")
    def _checks(self) -> PruneConfig:
        if self.budget_unit == "fraction" and self.latency_budget > 1.0:
            raise ValueError(f"latency_budget {self.latency_budget} is a fraction of the student's latency "
                             "(budget_unit: fraction) and must be <= 1; use budget_unit: ms for milliseconds")
        if self.optimizer.warmup_epochs >= self.epochs:
            raise ValueError("optimizer.warmup_epochs must be < epochs")
        if self.method == "taylor" and self.allocation != "knapsack":
            raise ValueError("method: taylor ranks channels by importance, which only allocation: knapsack uses "
                             "(threshold reads the soft masks' keep probabilities); set allocation: knapsack")
        if not self.channels and not (self.depth and self.method == "taylor"):
            raise ValueError("channels: false removes whole blocks only, which needs depth: true and method: taylor "
                             f"(got depth: {str(self.depth).lower()}, method: {self.method}); set channels: true to "
                             "narrow channel groups")
        return self


class CompareConfig(Section):
    """`compare`: baselines pruned to the pruned model's measured latency and fine-tuned for as
    many epochs as the prune stage trained."""

    methods: tuple[Literal["uniform", "l1", "unpruned"], ...] = Field(
        ("uniform", "l1", "unpruned"), description="uniform: every group scaled by one factor; l1: Torch-Pruning global "
        "L1; unpruned: the student trained as long, the equal-training reference (not cut to the budget)")
    seed: int = Field(0, ge=0)
    timing_passes: int = Field(40, ge=1, le=100000, description="timing windows of target.timing.window_ms in every "
                               "verdict of compare (matching a baseline, the final joint run)")
    timing_span_s: float = Field(2.0, ge=0.0, le=600.0, description="least wall time those windows spread over")

    @field_validator("methods")
    @classmethod
    def _each_once(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        twice = sorted({m for m in v if v.count(m) > 1})
        if twice:  # a second run would overwrite the first in compare.json after as long a fine-tune
            raise ValueError(f"lists {', '.join(twice)} more than once; list each method at most once")
        return v


class ExportConfig(Section):
    """`export`: ONNX from the slimmed model, checked against PyTorch."""

    opset: int = Field(17, ge=17, le=23, description="ONNX opset (17 or later)")
    atol: float = Field(1e-4, gt=0.0, le=1.0, description="max abs logit difference ONNX vs PyTorch (fp32)")


class EngineConfig(Section):
    """`engine`: the deployable engine, its accuracy and latency, and the budget check."""

    backend: Literal["auto", "tensorrt", "onnxruntime", "torch"] = Field(
        "auto", description="auto: TensorRT when installed and a GPU is the target; on a GPU without it ONNX Runtime's "
        "CUDA provider, else the PyTorch-native engine (torch); ONNX Runtime on a CPU target")
    precision: Literal["fp16", "fp32", "int8"] = Field("fp16", description="TensorRT precision (strongly typed: fp16 "
                                                       "builds an fp16 conversion of the ONNX model, int8 needs a Q/DQ "
                                                       "model); torch on CUDA: fp16 or fp32 (ONNX Runtime and torch on "
                                                       "a CPU: fp32)")
    aoti: bool = Field(True, description="torch engine: compile the torch.export program with AOTInductor (loaded "
                       "and checked in a separate process; the exported program is the fallback)")
    cuda_graph: bool = Field(True, description="torch engine on CUDA: replay the engine as a CUDA graph")
    calibration_images: int = Field(512, ge=1, le=100000, description="int8: training images for calibration; "
                                    "unused by the engine today: TensorRT int8 needs a Q/DQ (explicitly quantized) "
                                    "ONNX model, which a later stage will produce")
    max_batch: int = Field(64, ge=1, le=65536, description="TensorRT profile: largest batch (min 1, opt: target)")
    min_agreement: float = Field(0.995, ge=0.0, le=1.0, description="top-1 agreement with ONNX the engine must reach")
    timing_passes: int = Field(40, ge=1, le=100000, description="timing windows of target.timing.window_ms")
    timing_span_s: float = Field(2.0, ge=0.0, le=600.0, description="least wall time the windows spread over")
    on_over_budget: Literal["fail", "warn"] = Field("fail", description="measured latency over the budget (beyond "
                                                    "the measured noise): fail the stage or only warn")


class HandoffConfig(Section):
    """`handoff`: the bundle the deploy team receives."""

    name: str = Field("slimdeploy-classifier", description="model name in the manifest and README")


class DistillConfig(Section):
    """`distill`: oracle knowledge distillation from the teacher ensemble (search and student)."""

    mode: Literal["oracle", "ensemble", "none"] = Field("oracle", description="oracle: only right teachers; "
                                                        "ensemble: all teachers; none: cross-entropy only")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the distillation term")
    average: Literal["logits", "probs"] = Field("logits", description="how the right teachers are combined")


class SearchConfig(Section):
    """`search`: TAS width/depth search of the student under a parameter budget."""

    blocks: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(None, description="max blocks per stage; null: largest ResNet teacher")
    stage_widths: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(None, description="max stage widths; null: largest ResNet teacher")
    width_ratios: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    align: Literal["pad", "cwi"] = Field("pad", description="how candidate widths are aligned: zero padding or "
                                         "TAS channel-wise interpolation")
    budget_ratio: float = Field(0.25, gt=0.0, le=10.0, description="budget as a fraction of the largest teacher's parameters")
    budget_params: int | None = Field(None, ge=1, description="absolute budget; overrides budget_ratio")
    epochs: int = Field(10, ge=1, le=10000)
    batch_size: int = Field(64, ge=2, le=65536)
    lr: float = Field(0.1, gt=0.0, le=10.0)
    weight_decay: float = Field(5e-4, ge=0.0, lt=1.0)
    arch_lr: float = Field(0.02, gt=0.0, le=1.0, description="TAS uses 1e-3 over ~100x more steps")
    arch_weight_decay: float = Field(1e-3, ge=0.0, lt=1.0)
    tau_max: float = Field(5.0, gt=0.0)
    tau_min: float = Field(0.1, gt=0.0)
    cost_weight: float = Field(2.0, ge=0.0)
    tolerance: float = Field(0.05, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    device: Device = "auto"
    progress: bool = True

    @field_validator("width_ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 < r <= 1.0 for r in v):
            raise ValueError("width_ratios must be fractions in (0, 1]")
        return v

    @model_validator(mode="after")
    def _tau_order(self) -> SearchConfig:
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) must be <= tau_max ({self.tau_max})")
        return self


class StudentConfig(Section):
    """`student`: train the searched architecture from scratch with the distillation loss."""

    epochs: int = Field(15, ge=1, le=100000)
    seed: int = Field(0, ge=0)
    optimizer: OptimizerConfig = OptimizerConfig()

    @model_validator(mode="after")
    def _warmup(self) -> StudentConfig:
        if self.optimizer.warmup_epochs >= self.epochs:
            raise ValueError("optimizer.warmup_epochs must be < epochs")
        return self


def parse_section(params: dict[str, Any], section: str, model: type[T]) -> T:
    """Validate ``params[section]`` into ``model``; ConfigError lists every bad key as
    ``section.key: problem (got value)``."""
    if section not in params:
        raise ConfigError(f"params.yaml has no '{section}' section")
    return validate(params[section] if params[section] is not None else {}, model, section)


def validate(data: Any, model: type[T], prefix: str) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, model, prefix)) from None


def parse_teachers(params: dict[str, Any]) -> dict[str, TeacherConfig]:
    """`teachers` is a mapping name -> TeacherConfig; names become stage and directory names."""
    raw = params.get("teachers")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            "params.yaml: 'teachers' must be a non-empty mapping of name -> "
            "{arch, arch_config, weights, seed, epochs, optimizer}"
        )
    out = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"teachers: name {name!r} is not allowed; use letters, digits, '_', '-', '.'"
            )
        out[name] = validate(entry, TeacherConfig, f"teachers.{name}")
    return out


def _sections() -> dict[str, type[Section]]:
    return {
        "prepare": PrepareConfig, "train": TrainConfig, "ensemble": EnsembleConfig, "distill": DistillConfig,
        "search": SearchConfig, "student": StudentConfig, "target": TargetConfig, "profile": ProfileConfig,
        "prune": PruneConfig, "slim": SlimConfig, "compare": CompareConfig, "export": ExportConfig,
        "engine": EngineConfig, "handoff": HandoffConfig,
    }


def validate_params(params: dict[str, Any]) -> None:
    """The whole params file, every section through its typed config, before any work: a typo in
    `prune` stops the first stage, not the eighth. Every problem of every section is listed in one
    ConfigError; unknown sections are named with the allowed ones. A section that is absent is left
    to the stage that needs it."""
    sections = _sections()
    known = {*sections, "teachers", "run"}
    problems = [f"  {k}: unknown section; allowed: {', '.join(sorted(known))}" for k in params if k not in known]
    for name, model in sections.items():
        if name in params:
            try:
                parse_section(params, name, model)
            except ConfigError as err:
                problems += [line for line in str(err).splitlines() if line.startswith("  ")] or [f"  {name}: {err}"]
    if "teachers" in params:
        try:
            parse_teachers(params)
        except ConfigError as err:
            problems += [line for line in str(err).splitlines() if line.startswith("  ")] or [f"  teachers: {err}"]
    if "run" in params:
        launcher = (params.get("run") or {}).get("launcher") if isinstance(params.get("run"), dict) else None
        if not isinstance(launcher, str) or not launcher.strip():
            problems.append("  run.launcher: must be a command such as `python` or "
                            "`torchrun --standalone --nproc_per_node=N`")
    if problems:
        raise ConfigError("invalid params.yaml:\n" + "\n".join(problems))


def _format(err: ValidationError, model: type[BaseModel], prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            owner = _owner(model, e["loc"][:-1])
            msg = f"unknown key; allowed: {', '.join(owner.model_fields)}" if owner else msg
        lines.append(f"  {loc}: {msg} (got {e.get('input')!r})")
    return "invalid params.yaml:\n" + "\n".join(lines)


def _owner(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model
