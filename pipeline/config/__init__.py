"""Typed, frozen configs, one per params.yaml section. Unknown keys, wrong types and
out-of-range values are rejected before any work, with the offending key named. Import these
names from ``pipeline.config``; one module per idea:

- ``base``: ``Section`` (the base of every section), ``Device``, ``parse_section`` and
  ``validate`` with the ConfigError messages (``section.key: problem (got value)``).
- ``entries``: ``ModelEntry``, what every model entry names (``arch``, ``arch_config``, ``weights``).
- ``training``: the sections that train (prepare, train, teachers, ensemble, distill, search,
  student) and ``parse_teachers``.
- ``deploy``: the deployment sections (compress: which network is compressed; target, profile,
  prune, slim, compare, export, engine, handoff).
- ``params``: ``validate_params``, the whole file checked at once.
"""

from pipeline.config.base import Device, Section, parse_section, validate
from pipeline.config.deploy import (
    PRUNE_OPTIMIZER,
    STUDENT_MODEL,
    CompareConfig,
    CompressConfig,
    EngineConfig,
    ExportConfig,
    HandoffConfig,
    ProfileConfig,
    PruneConfig,
    SlimConfig,
    TargetConfig,
    TimingConfig,
)
from pipeline.config.entries import ARCH_HELP, WEIGHTS_HELP, ModelEntry, WeightsRef
from pipeline.config.params import validate_params
from pipeline.config.training import (
    DistillConfig,
    EnsembleConfig,
    OptimizerConfig,
    PrepareConfig,
    SearchConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    parse_teachers,
)

__all__ = [
    "ARCH_HELP", "PRUNE_OPTIMIZER", "STUDENT_MODEL", "CompressConfig", "WEIGHTS_HELP", "CompareConfig", "Device", "DistillConfig", "EngineConfig",
    "EnsembleConfig", "ExportConfig", "HandoffConfig", "ModelEntry", "OptimizerConfig", "PrepareConfig",
    "ProfileConfig", "PruneConfig", "SearchConfig", "Section", "SlimConfig", "StudentConfig", "TargetConfig",
    "TeacherConfig", "TimingConfig", "TrainConfig", "WeightsRef", "parse_section", "parse_teachers", "validate",
    "validate_params",
]
