"""Latency on the deployment target: timing, runtimes, the channel step, the lookup table and
its calibration on real sub-networks. Stages import these names only.

- ``timing``: the measurement protocol (interleaved windows, fastest window median).
- ``backends``: ONNX Runtime, PyTorch (CPU/CUDA, CUDA graphs) and TensorRT behind one interface
  (the runtimes themselves are ``pipeline.runtimes``); ``paired_ms`` rescales a paired measurement,
  ``median_paired`` takes the median over repeated readings.
- ``staircase``: the target's channel step, detected on a repeated probe or stated by the target.
- ``table``: per-unit latency on a sampled lattice, interpolated, differentiable in the widths.
- ``calibrate``: scale and offset fitted on measured sub-networks, error on a held-out set.
"""

from pipeline.latency.backends import (
    BACKENDS,
    Backend,
    BackendUnavailable,
    FingerprintMismatch,
    check_fingerprint,
    device_record,
    make_backend,
    measure_reference,
    median_paired,
    paired_ms,
    target_backend,
    timing_protocol,
)
from pipeline.latency.calibrate import CalibrationResult, calibrate, error_metrics, fit_scale_offset
from pipeline.latency.staircase import StepDetection, detect_step, measure_step
from pipeline.latency.table import (
    LatencyPredictor,
    LatencyTable,
    build_table,
    check_supported_layers,
    conv_layers,
    grid_values,
    micro_model,
    sample_values,
)
from pipeline.latency.timing import Timing, TimingProtocol

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailable", "CalibrationResult", "FingerprintMismatch", "LatencyPredictor",
    "LatencyTable", "StepDetection", "Timing", "TimingProtocol", "build_table", "calibrate", "check_fingerprint",
    "check_supported_layers", "conv_layers", "detect_step", "device_record", "error_metrics", "fit_scale_offset",
    "grid_values", "make_backend", "measure_reference", "measure_step", "median_paired", "micro_model", "paired_ms",
    "sample_values", "target_backend", "timing_protocol",
]
