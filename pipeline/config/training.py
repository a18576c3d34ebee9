"""Configs of the sections that train: data preparation (`prepare`), the settings every
training stage shares (`train`, the optimiser), the teachers and their ensemble, distillation,
the student's architecture search and its training."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Device, Section, validate
from pipeline.config.entries import ModelEntry
from pipeline.errors import ConfigError
from pipeline.images import DEFAULT_MAX_PIXELS

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
    storage: Literal["memory", "files"] = Field(
        "memory", description="memory: decode every image once into uint8 arrays (fastest; digits, CIFAR-sized "
        "data); files (imagefolder directory): keep the file list, decode images from disk as they are used, in "
        "DataLoader workers, so the dataset may be larger than memory")
    shorter_side: int | None = Field(
        None, ge=4, le=4096, description="files: evaluation view = resize the shorter side to this, then the centre "
        "image_size x image_size crop; null: image_size / 0.875 (224 -> 256)")

    @model_validator(mode="after")
    def _files_need_a_folder(self) -> PrepareConfig:
        if self.storage == "files":
            if self.source != "imagefolder":
                raise ValueError(f"storage: files reads an image folder from disk; source is {self.source!r} "
                                 "(use storage: memory)")
            if self.image_size is None:
                raise ValueError("storage: files needs image_size (the network's input size, e.g. 224)")
            if self.shorter_side is not None and self.shorter_side < self.image_size:
                raise ValueError(f"shorter_side {self.shorter_side} is below image_size {self.image_size}: the centre "
                                 "crop would not fit")
        return self

    @property
    def eval_shorter_side(self) -> int | None:
        """files: the evaluation view's shorter side (``shorter_side`` or image_size / 0.875)."""
        if self.storage != "files" or self.image_size is None:
            return None
        return self.shorter_side or round(self.image_size / 0.875)


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
    augment: Literal["none", "padcrop_flip", "random_resized_crop"] = Field(
        "none", description="padcrop_flip for natural 32x32 images; random_resized_crop (prepare.storage: files): "
        "ImageNet-style random resized crop to image_size and horizontal flip, torchvision's transforms")
    crop_padding: int = Field(4, ge=0, le=64)
    crop_scale: tuple[float, float] = Field(
        (0.25, 1.0), description="random_resized_crop: the crop's area as a fraction of the image, (min, max)")
    workers: int | None = Field(
        None, ge=0, le=64, description="prepare.storage files: DataLoader worker processes decoding images; null: one "
        "per CPU core, at most 8; 0: decode in the training process")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA (ignored on CPU)")
    num_threads: int | None = Field(None, ge=1, le=256, description="CPU threads for torch; null: torch's default")
    cuda_graph: bool = Field(True, description="on one CUDA device: capture the training step (forward, backward, "
                             "optimiser) in a CUDA graph and replay it; eager on CPU, under DDP, or when capture fails")
    progress: bool = Field(True, description="show progress bars")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"must be (min, max) with 0 < min <= max <= 1, got {list(v)}")
        return v


class TeacherConfig(ModelEntry):
    """One entry of `teachers`: a model (``arch``, ``arch_config``, optional ``weights``: see
    ``pipeline.config.entries.ModelEntry``) and how to train it. With ``weights`` the teacher
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
    stem_stride: Literal[1, 2, 4] | None = Field(None, description="the stem's stride: 1 (CIFAR), 2, or 4 (stride-2 "
                                                 "convolution and max-pool, ImageNet-style); null: from the image size "
                                                 "(1 up to 32 px, 2 up to 64 px, 4 above)")
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
