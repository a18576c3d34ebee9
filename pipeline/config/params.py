"""The whole params file at once: every section through its typed config, every problem
listed in one ConfigError."""

from __future__ import annotations

from typing import Any

from pipeline.config.base import Section, parse_section
from pipeline.config.deploy import (
    AUTO_PRECISIONS,
    CompareConfig,
    CompressConfig,
    EngineConfig,
    ExportConfig,
    HandoffConfig,
    ProfileConfig,
    PruneConfig,
    SlimConfig,
    TargetConfig,
)
from pipeline.config.training import (
    DistillConfig,
    EnsembleConfig,
    PrepareConfig,
    SearchConfig,
    StudentConfig,
    TrainConfig,
    parse_teachers,
)
from pipeline.errors import ConfigError


def _sections() -> dict[str, type[Section]]:
    return {
        "prepare": PrepareConfig, "train": TrainConfig, "ensemble": EnsembleConfig, "distill": DistillConfig,
        "search": SearchConfig, "student": StudentConfig, "target": TargetConfig, "profile": ProfileConfig,
        "prune": PruneConfig, "slim": SlimConfig, "compare": CompareConfig, "export": ExportConfig,
        "engine": EngineConfig, "handoff": HandoffConfig, "compress": CompressConfig,
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
    teachers = None
    if "teachers" in params:
        try:
            teachers = parse_teachers(params)
        except ConfigError as err:
            problems += [line for line in str(err).splitlines() if line.startswith("  ")] or [f"  teachers: {err}"]
    problems += _compressed_teacher(params, teachers)
    problems += _augment_needs_files(params)
    problems += _int8_target(params)
    problems += _bf16_engine(params)
    if "run" in params:
        launcher = (params.get("run") or {}).get("launcher") if isinstance(params.get("run"), dict) else None
        if not isinstance(launcher, str) or not launcher.strip():
            problems.append("  run.launcher: must be a command such as `python` or "
                            "`torchrun --standalone --nproc_per_node=N`")
    if problems:
        raise ConfigError("invalid params.yaml:\n" + "\n".join(problems))


def _compressed_teacher(params: dict[str, Any], teachers: dict[str, Any] | None) -> list[str]:
    """compress.model naming a teacher entry that `teachers` does not have."""
    try:
        name = parse_section(params, "compress", CompressConfig).teacher if "compress" in params else None
    except ConfigError:
        return []  # listed with the section's own problems
    if name is None or teachers is None or name in teachers:
        return []
    return [f"  compress.model: names teacher {name!r}, which is not an entry of `teachers` "
            f"(entries: {', '.join(teachers)}); add it there (your model: arch, weights, epochs: 0)"]


def _bf16_engine(params: dict[str, Any]) -> list[str]:
    """engine.precision bf16 asked of an engine that has no bf16 (the torch engine on CUDA has)."""
    try:
        engine = parse_section(params, "engine", EngineConfig) if "engine" in params else None
    except ConfigError:
        return []
    if engine is None or engine.precision != "bf16" or engine.backend not in ("tensorrt", "onnxruntime"):
        return []
    return [f"  engine.precision: bf16 runs on the torch engine on CUDA only, not engine.backend {engine.backend}; "
            "set engine.backend torch (or auto on a GPU without TensorRT), or precision fp16, fp32 or auto"]


def _int8_target(params: dict[str, Any]) -> list[str]:
    """target.precision int8 measured by a runtime that cannot, or deployed by an engine in another precision."""
    try:
        target = parse_section(params, "target", TargetConfig) if "target" in params else None
        engine = parse_section(params, "engine", EngineConfig) if "engine" in params else None
    except ConfigError:
        return []  # listed with the sections' own problems
    if target is None or target.precision not in ("int8", "auto"):
        return []
    if target.precision == "auto":
        return _auto_target(target, engine or EngineConfig())
    out = []
    if (target.backend, target.device) != ("onnxruntime", "cpu"):
        out.append(f"  target.precision: int8 is measured with backend onnxruntime on device cpu (got {target.backend} "
                   f"on {target.device}); on a GPU, measure fp16 and deploy int8 with engine.backend tensorrt")
    if engine is not None and engine.precision not in ("int8", "auto"):
        out.append(f"  engine.precision: {engine.precision}, but target.precision is int8: the budget is verified on "
                   "the engine pruning measured; set engine.precision: int8")
    if engine is not None and engine.int8_activations not in ("auto", target.int8_activations):
        out.append(f"  engine.int8_activations: {engine.int8_activations}, but every latency was measured with "
                   f"target.int8_activations {target.int8_activations}; set them alike (or engine's to auto)")
    return out


def _auto_target(target: TargetConfig, engine: EngineConfig) -> list[str]:
    """target.precision auto: a runtime it can choose on, and an engine that deploys what it chose."""
    out = []
    if (target.backend, target.device) not in AUTO_PRECISIONS:
        where = ", ".join(f"backend {b} on device {d}" for b, d in AUTO_PRECISIONS)
        out.append(f"  target.precision: auto chooses on {where} (got backend {target.backend} on {target.device}); "
                   "set target.precision to fp32 or fp16")
    if engine.precision != "auto":
        out.append(f"  engine.precision: {engine.precision}, but target.precision is auto: the engine deploys the "
                   "precision the precision stage chose; set engine.precision: auto")
    if engine.int8_activations not in ("auto", target.int8_activations):
        out.append(f"  engine.int8_activations: {engine.int8_activations}, but int8 latencies are measured with "
                   f"target.int8_activations {target.int8_activations}; set them alike (or engine's to auto)")
    return out


def _augment_needs_files(params: dict[str, Any]) -> list[str]:
    """train.augment random_resized_crop with images held in memory (already resized: nothing to crop from)."""
    try:
        augment = parse_section(params, "train", TrainConfig).augment if "train" in params else "none"
        storage = parse_section(params, "prepare", PrepareConfig).storage if "prepare" in params else "memory"
    except ConfigError:
        return []  # listed with the sections' own problems
    if augment == "random_resized_crop" and storage != "files":
        return ["  train.augment: random_resized_crop crops the full-size images on disk; it needs prepare.storage: "
                "files (an image folder), or use padcrop_flip / none with images in memory"]
    return []
