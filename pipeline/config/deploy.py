"""Configs of the deployment sections: the target and how latency is timed on it, the latency
table (`profile`), pruning under the budget, slimming, the baselines (`compare`), ONNX export,
the engine and the handoff bundle."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Section
from pipeline.config.training import OptimizerConfig

STUDENT_MODEL = "artifacts/student/model"
TEACHER_MODELS = "artifacts/teachers/"


class CompressConfig(Section):
    """`compress`: the network that profile, prune, compare and handoff start from, as a path stem:
    ``<stem>.pt`` (its checkpoint) and ``<stem>.arch.json`` (its architecture, which the latency
    table is built from). The searched student (the default), or a teacher entry: your own trained
    model, given with ``weights:`` (``epochs: 0`` takes it as it is). dvc.yaml reads the stem, so
    the stages that are not upstream of the bundle (search and the student, when a teacher entry is
    compressed) do not run under ``dvc repro handoff ensemble`` (``make run``)."""

    model: str = Field(STUDENT_MODEL, description=f"{STUDENT_MODEL} (the searched student) or "
                       f"{TEACHER_MODELS}<name> (a teacher entry, e.g. your own model)")

    @field_validator("model")
    @classmethod
    def _stem(cls, v: str) -> str:
        name = v.removeprefix(TEACHER_MODELS)
        if v != STUDENT_MODEL and (name == v or not name or "/" in name or name.endswith(".pt")):
            raise ValueError(f"must be {STUDENT_MODEL} (the searched student) or {TEACHER_MODELS}<name> with <name> "
                             "an entry of `teachers` (your own model), without the .pt suffix")
        return v

    @property
    def teacher(self) -> str | None:
        """The teacher entry compressed, or None for the searched student."""
        return None if self.model == STUDENT_MODEL else self.model.removeprefix(TEACHER_MODELS)


class TimingConfig(Section):
    """`target.timing`: how every latency is measured (pipeline/latency/timing.py): each model is
    timed in `passes` windows of `window_ms`, interleaved with the other models measured with it
    and spread over at least `span_s` seconds; the estimate is the fastest window's median."""

    passes: int = Field(10, ge=1, le=1000, description="windows per model")
    window_ms: float = Field(5.0, gt=0.0, le=10000.0, description="milliseconds of timed calls per window")
    span_s: float = Field(0.5, ge=0.0, le=600.0, description="least wall time the windows of a few models spread over")


# target.precision auto: what it chooses among, per (backend, device) (pipeline/precision.py)
AUTO_PRECISIONS: dict[tuple[str, str], tuple[str, ...]] = {("onnxruntime", "cpu"): ("fp32", "int8")}


class TargetConfig(Section):
    """`target`: the deployment runtime and device latency is measured on (profile, prune, engine)."""

    backend: Literal["onnxruntime", "torch", "tensorrt"] = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int = Field(1, ge=1, le=4096, description="deployment batch size")
    precision: Literal["fp32", "fp16", "int8", "auto"] = Field(
        "fp32", description="precision every latency is measured in (profile's table, prune's closed loop, compare, "
        "the engine): fp16 on CUDA (torch, tensorrt); int8 with onnxruntime on a CPU: each network measured as its "
        "post-training Q/DQ model (pipeline/quantize.py), so pruning prices what quantization saves per layer; "
        "needs engine.precision: int8 or auto. auto (onnxruntime on a CPU): the precision stage chooses int8 when the "
        "trained network loses at most engine.max_accuracy_drop in it on the validation split and it measures faster "
        "than fp32 on the target, else fp32 (pipeline/precision.py); needs engine.precision: auto")
    int8_activations: Literal["uint8", "int8"] = Field(
        "uint8", description="precision int8: the activation type every latency is measured with (uint8: U8S8 "
        "kernels; int8: S8S8); which is faster depends on the CPU (python -m benchmarks.int8)")
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
    budget_reference: Literal["fp32", "target"] = Field(
        "fp32", description="budget_unit fraction: of the student's latency in fp32 on the target's runtime (fp32 = "
        "what it costs before quantization: with target.precision int8 pruning and quantization share the saving) "
        "or in target.precision (target); the same when the target is fp32")
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
    taylor_labels: Literal["data", "sampled"] = Field("data", description="taylor: the loss the gradient is of; data = "
                                                      "the training loss on the data's labels (HALP); sampled = each "
                                                      "sample's label drawn from the network's own output "
                                                      "softened by distill.temperature, "
                                                      "per sample: the mask's Fisher information, how far removing a "
                                                      "channel moves the outputs (for a trained network whose "
                                                      "training loss is near zero; always per sample)")
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
    loop_timing: Literal["verdict", "target"] = Field(
        "verdict", description="closed loop's timing protocol: verdict = compare's (compare.timing_passes over "
        "compare.timing_span_s), so ours is decided as every baseline is matched and judged; target = target.timing")
    loop_readings: int = Field(3, ge=1, le=100, description="closed loop: independent paired readings of each "
                               "network, the median taken (one reading of a small network on a shared machine can "
                               "be 20% off, and stopping on the first reading in the band keeps the lucky ones)")
    reference_readings: int = Field(5, ge=1, le=100, description="budget_reference fp32 with a target in another "
                                    "precision: the fewest readings (median kept) of every measurement paired with "
                                    "the fp32 student, in the closed loop, compare's verdicts and the engine's check "
                                    "(the int8 / fp32 ratio of one network moves more between readings than two "
                                    "networks in one precision do); recorded in the budget")
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

    methods: tuple[Literal["uniform", "l1", "tp_norm", "tp_taylor", "unpruned"], ...] = Field(
        ("uniform", "l1", "unpruned"), description="uniform: every group scaled by one factor; l1: Torch-Pruning global "
        "L1 per filter; tp_norm: Torch-Pruning group L2 norm; tp_taylor: Torch-Pruning group Taylor (gradients of "
        "prune.taylor_batches training batches); all Torch-Pruning ones global, round_to the channel step; unpruned: "
        "the student trained as long, the equal-training reference (not cut to the budget)")
    seed: int = Field(0, ge=0)
    timing_passes: int = Field(40, ge=1, le=100000, description="timing windows of target.timing.window_ms in every "
                               "verdict of compare (matching a baseline, the final joint run)")
    timing_span_s: float = Field(2.0, ge=0.0, le=600.0, description="least wall time those windows spread over")
    timing_readings: int = Field(3, ge=1, le=100, description="independent readings of every compare verdict, the "
                                 "median of their ratios to the student taken (as prune.loop_readings)")

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
    precision: Literal["fp16", "bf16", "fp32", "int8", "auto"] = Field(
        "fp16", description="TensorRT (strongly typed): fp16 builds an fp16 conversion of the ONNX model, int8 its "
        "post-training Q/DQ model (pipeline/quantize.py, symmetric int8 activations), fp32 as is; torch on CUDA: fp16, "
        "bf16 or fp32; ONNX Runtime on a CPU: fp32, or int8 (post-training static quantization to a Q/DQ model); "
        "fp16 and bf16 on a CPU run fp32. auto: every precision the engine runs on the target built, timed "
        "together, and the fastest kept whose validation accuracy is within max_accuracy_drop of the best")
    aoti: bool = Field(True, description="torch engine: compile the torch.export program with AOTInductor (loaded "
                       "and checked in a separate process; the exported program is the fallback)")
    cuda_graph: bool = Field(True, description="torch engine on CUDA: replay the engine as a CUDA graph")
    calibration_images: int = Field(512, ge=1, le=100000, description="int8: training images (evaluation view) "
                                    "the activation ranges are calibrated on; at most the training split's count")
    int8_activations: Literal["auto", "uint8", "int8"] = Field(
        "auto", description="int8 on ONNX Runtime: activation type (uint8: asymmetric, U8S8 kernels; int8: symmetric, "
        "S8S8); auto: both quantized and measured on the target, the faster kept. TensorRT: int8 (or auto); uint8 "
        "is refused")
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0, description="int8: largest test accuracy drop of the "
                                     "quantized engine below the fp32 ONNX model (0.01: one point); above it the "
                                     "stage fails. precision auto: the largest validation accuracy drop a faster "
                                     "precision may cost")
    int8_fallback: Literal["float_layers", "none"] = Field(
        "float_layers", description="int8: when every layer quantized drops the validation accuracy more than "
        "max_accuracy_drop, float_layers = measure each layer's sensitivity (what leaving it alone in float "
        "recovers) and leave the most sensitive 1, 2, 4, ... in float until the drop is within the bound; none = "
        "every layer int8 (the stage then fails on the test split's drop)")
    max_batch: int = Field(64, ge=1, le=65536, description="TensorRT profile: largest batch (min 1, opt: target)")
    min_agreement: float = Field(0.995, ge=0.0, le=1.0, description="top-1 agreement with ONNX the engine must reach")
    timing_passes: int = Field(40, ge=1, le=100000, description="timing windows of target.timing.window_ms")
    timing_span_s: float = Field(2.0, ge=0.0, le=600.0, description="least wall time the windows spread over")
    timing_readings: int = Field(3, ge=1, le=100, description="independent paired readings of the budget verdict "
                                 "(the slimmed network, or a quantized engine itself, with the student), the median "
                                 "of their ratios taken (as compare.timing_readings and prune.loop_readings)")
    on_over_budget: Literal["fail", "warn"] = Field("fail", description="measured latency over the budget (beyond "
                                                    "the measured noise): fail the stage or only warn")


class HandoffConfig(Section):
    """`handoff`: the bundle the deploy team receives."""

    name: str = Field("slimdeploy-classifier", description="model name in the manifest and README")
