"""Oracle knowledge distillation from an ensemble (Kang, Mun, Han, AAAI 2020).

Per sample, the target comes only from the teachers that predict the label correctly; when none
does, the sample gets plain cross-entropy. The right teachers are combined by averaging their
logits (``average="logits"``, the default) or their softened probabilities (``"probs"``); the
paper does not say which, both are implemented and tested.

    L_i = (1 - a) * CE(y_i, s_i) + a * T^2 * KL(q_i || softmax(s_i / T))   if some teacher is right
    L_i = CE(y_i, s_i)                                                     otherwise

``mode="ensemble"`` uses every teacher on every sample (classic ensemble KD) and ``mode="none"``
is cross-entropy alone: the ablation baselines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import AnySplit, Split, normalize

Mode = Literal["oracle", "ensemble", "none"]


def distillation_target(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                        mode: Mode = "oracle", average: str = "logits") -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets (B, K) and a (B,) bool of samples that have one.

    ``teacher_logits``: (M, B, K). Oracle: only teachers whose argmax equals the label count.
    """
    m, b, _ = teacher_logits.shape
    if mode == "oracle":
        use = teacher_logits.argmax(-1) == labels[None]  # (M, B)
    else:
        use = torch.ones(m, b, dtype=torch.bool, device=teacher_logits.device)
    weight = use.to(teacher_logits.dtype)[..., None]  # (M, B, 1)
    count = weight.sum(0).clamp(min=1.0)  # (B, 1)
    if average == "logits":
        target = F.softmax((weight * teacher_logits).sum(0) / count / temperature, dim=-1)
    elif average == "probs":
        target = (weight * F.softmax(teacher_logits / temperature, dim=-1)).sum(0) / count
    else:
        raise ValueError(f"average must be 'logits' or 'probs', got {average!r}")
    return target, use.any(0)


def oracle_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 4.0, alpha: float = 0.9, mode: Mode = "oracle",
                   average: str = "logits") -> dict[str, torch.Tensor]:
    """Losses as a dict: ``loss`` (to optimise), ``ce``, ``kd`` (mean over distilled samples) and
    ``distilled`` (fraction of samples with a target). Shapes: student (B, K), teachers (M, B, K)."""
    ce = F.cross_entropy(student_logits, labels, reduction="none")
    if mode == "none":
        zero = ce.new_zeros(())
        return {"loss": ce.mean(), "ce": ce.mean(), "kd": zero, "distilled": zero}
    target, has = distillation_target(teacher_logits.detach(), labels, temperature, mode, average)
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (target * (torch.log(target.clamp_min(1e-12)) - log_p)).sum(-1) * temperature**2
    per_sample = torch.where(has, (1 - alpha) * ce + alpha * kl, ce)
    # mean over the distilled samples (0 when none), without reading ``has`` on the host: capturable
    kd = (kl * has).sum() / has.sum().clamp_min(1)
    return {"loss": per_sample.mean(), "ce": ce.mean(), "kd": kd, "distilled": has.float().mean()}


class TeacherEnsemble(nn.Module):
    """Frozen teachers in eval mode; ``forward(x)`` returns stacked logits (M, B, K).

    ``memoize(inputs)`` runs the teachers once on a fixed set of inputs (the training split, when
    it is not augmented: every epoch then shows the teachers the same images) and ``forward``
    looks each row of a batch up by its exact bytes, running the teachers only on rows it has not
    seen. On the digits default the teachers' forward passes were about two thirds of a
    distillation step's time on a 2-core CPU. A lookup reads the batch on the host, so it is for
    CPU training only (``memoize_split`` decides)."""

    def __init__(self, teachers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(teachers)
        for p in self.parameters():
            p.requires_grad_(False)
        self._memo: dict[bytes, int] = {}
        self._memo_logits: torch.Tensor | None = None  # (M, N, K) on the CPU

    def train(self, mode: bool = True) -> TeacherEnsemble:  # teachers never leave eval mode
        return super().train(False)

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The teachers' logits (M, B, K), always computed."""
        return torch.stack([t(x).float() for t in self.members])

    @torch.no_grad()
    def memoize(self, inputs: torch.Tensor, batch_size: int) -> None:
        """Compute and keep the logits of ``inputs`` (N, C, H, W), in batches of ``batch_size`` (the
        training batch: a convolution's result can depend on the batch size in the last bits)."""
        cpu = inputs.detach().to("cpu", torch.float32).contiguous()
        self._memo_logits = torch.cat([self.run(cpu[i: i + batch_size]) for i in range(0, len(cpu), batch_size)], 1)
        self._memo = {row.numpy().tobytes(): i for i, row in enumerate(cpu)}

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._memo_logits is None or x.device.type != "cpu" or x.dtype != torch.float32:
            return self.run(x)
        found = [self._memo.get(row.numpy().tobytes()) for row in x.detach().contiguous()]
        if None not in found:
            return self._memo_logits[:, found]
        return self.run(x)


def memoize_split(ensemble: TeacherEnsemble, inputs: torch.Tensor, augment: str, device: torch.device,
                  batch_size: int) -> bool:
    """Memoize the teachers' logits of ``inputs`` (the normalised training split) where that is
    exact and helps: no augmentation (the teachers see the same rows every epoch) and training on
    the CPU. Returns whether it did."""
    if augment != "none" or device.type != "cpu" or any(p.device.type != "cpu" for p in ensemble.parameters()):
        return False
    ensemble.memoize(inputs, batch_size)
    return True


def training_ensemble(teachers: Sequence[nn.Module], train: AnySplit, mean: torch.Tensor, std: torch.Tensor,
                      augment: str, device: torch.device, batch_size: int) -> TeacherEnsemble:
    """The frozen teachers on ``device``, with their logits of the training split (``train``'s
    uint8 images, normalised by ``mean``/``std`` as the training loop does) memoized where
    ``memoize_split`` allows it; never for images read from disk (the dataset may not fit in
    memory). ``batch_size``: the per-rank training batch."""
    ensemble = TeacherEnsemble(teachers).to(device)
    if isinstance(train, Split):
        memoize_split(ensemble, normalize(train.x, mean, std), augment, device, batch_size)
    return ensemble


def kd_criterion(teachers: TeacherEnsemble, temperature: float, alpha: float, mode: Mode, average: str = "logits"):  # noqa: ANN201
    """A ``pipeline.train`` criterion: teachers run on the same (augmented, normalised) batch."""

    def criterion(logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        t = teachers(inputs) if mode != "none" else logits.new_zeros((0, *logits.shape))
        return oracle_kd_loss(logits, t, labels, temperature, alpha, mode, average)["loss"]

    return criterion
