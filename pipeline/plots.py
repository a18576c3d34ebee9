"""PNG renderings of what DVC also gets as CSV/JSON (``dvc plots show`` needs a CDN offline)."""

from __future__ import annotations

import textwrap
from collections.abc import Collection, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def confusion_png(cm: torch.Tensor, classes: Sequence[str], path: str | Path, title: str) -> None:
    """Row-normalised confusion matrix with counts written in each cell."""
    k = len(classes)
    norm = cm.float() / cm.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    _save(fig, path)


def history_png(history: Sequence[dict[str, float]], path: str | Path, title: str) -> None:
    """Loss and accuracy per epoch (train and validation)."""
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    a.plot(ep, [h["val_loss"] for h in history], label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(ep, [h["train_acc"] for h in history], label="train")
    b.plot(ep, [h["val_acc"] for h in history], label="val")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.legend()
    fig.suptitle(title)
    _save(fig, path)


def predicted_vs_measured_png(pred: Sequence[float], meas: Sequence[float], path: str | Path, title: str,
                              extra: tuple[Sequence[float], Sequence[float], str] | None = None,
                              label: str = "held-out sub-networks") -> None:
    """Scatter of predicted against measured latency (ms) with the y = x line."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.scatter(meas, pred, s=18, label=label)
    pts = [*pred, *meas]
    if extra is not None:
        ax.scatter(extra[1], extra[0], s=14, marker="x", label=extra[2])
        pts += [*extra[0], *extra[1]]
    lo, hi = min(pts), max(pts)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def staircase_png(ms: Sequence[float], path: str | Path, title: str, multiple: int) -> None:
    """Latency of one layer against its output channels, with the detected step marked."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ch = list(range(1, len(ms) + 1))
    ax.step(ch, [m * 1e3 for m in ms], where="mid")
    ax.plot(ch, [m * 1e3 for m in ms], ".", ms=3)
    if multiple > 1:
        for c in range(multiple, len(ms) + 1, multiple):
            ax.axvline(c + 0.5, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("output channels")
    ax.set_ylabel("latency (us)")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def widths_png(rows: Sequence[dict[str, object]], path: str | Path, title: str) -> None:
    """Kept against full channels per group (horizontal bars, network order)."""
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * len(rows)))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [r["full"] for r in rows], color="#dddddd", label="full")
    ax.barh(y, [r["kept"] for r in rows], color="#3b7dd8", label="kept")
    for yi, r in zip(y, rows):
        ax.text(r["full"], yi, f" {r['kept']}/{r['full']} ({r['kind']})", va="center", fontsize=7)
    ax.set_yticks(y, [str(r["group"]) for r in rows], fontsize=7)
    ax.set_xlabel("channels")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def pareto_png(points: Sequence[dict[str, object]], path: str | Path, title: str, note: str = "",
               scatter: Collection[str] = (), ylabel: str = "test accuracy (%)") -> None:
    """Accuracy against measured latency, one series per ``method``; points joined in latency order
    (one method's trade-off), except the series in ``scatter`` (unrelated models, e.g. teachers).
    A point may carry error bars: ``accuracy_err`` (a fraction, symmetric) and ``latency_err`` (ms:
    one value, symmetric, or [below, above]); ``note`` says what they are."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in dict.fromkeys(str(p["method"]) for p in points):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: float(p["latency_ms"]))
        x = [float(p["latency_ms"]) for p in pts]
        y = [100 * float(p["accuracy"]) for p in pts]
        yerr = [100 * float(p.get("accuracy_err", 0.0)) for p in pts]
        lat = [p.get("latency_err", 0.0) for p in pts]
        xerr = [[float(e[0]) if isinstance(e, (list, tuple)) else float(e) for e in lat],
                [float(e[1]) if isinstance(e, (list, tuple)) else float(e) for e in lat]]
        has_err = any(yerr) or any(xerr[0]) or any(xerr[1])
        ax.errorbar(x, y, yerr=yerr if has_err else None, xerr=xerr if has_err else None,
                    fmt="o-" if len(pts) > 1 and method not in scatter else "o", capsize=3, label=method)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    if note:  # wrapped to the figure's width (7 pt: about 105 characters a line)
        lines = textwrap.wrap(note, 105)
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=7, ha="left", va="bottom")
        fig.subplots_adjust(bottom=0.13 + 0.025 * len(lines))
    _save(fig, path)
