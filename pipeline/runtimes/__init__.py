"""The runtimes a model is deployed to and timed on, one module each; the deployment code
(``pipeline.deploy``) and the latency backends (``pipeline.latency``) both use these, and no
other module talks to a runtime directly.

- ``onnx_export``: the one ONNX exporter (deployment file, or bytes for profiling).
- ``onnxruntime``: the one ONNX Runtime session builder and the logits of a session.
- ``precision``: a model's precision from its own types, and the fp32 -> fp16 ONNX conversion.
- ``tensorrt``: the one TensorRT engine builder (strongly typed, TensorRT 10.x and 11.x) and a
  runner of the engine (imported lazily).
- ``torch_engine``: the PyTorch-native engine (torch.export, AOTInductor, CUDA graphs);
  ``aoti_check`` is its out-of-process check of a compiled package (``python -m``).
"""

from pipeline.runtimes.errors import ConversionError, RuntimeUnavailable
from pipeline.runtimes.onnx_export import INPUT, METADATA_KEY, OUTPUT, export_onnx
from pipeline.runtimes.onnxruntime import ort_has_cuda, ort_logits, ort_providers, ort_session
from pipeline.runtimes.precision import convert_to_fp16, onnx_precision
from pipeline.runtimes.tensorrt import (
    TensorRTRunner,
    build_tensorrt_plan,
    check_tensorrt_version,
    tensorrt_available,
)
from pipeline.runtimes.torch_engine import (
    COMPILED,
    EXPORTED,
    TorchEngineError,
    TorchEngineRunner,
    build_torch_engine,
)

__all__ = [
    "COMPILED", "EXPORTED", "INPUT", "METADATA_KEY", "OUTPUT", "ConversionError", "RuntimeUnavailable",
    "TensorRTRunner", "TorchEngineError", "TorchEngineRunner", "build_tensorrt_plan", "build_torch_engine",
    "check_tensorrt_version", "convert_to_fp16", "export_onnx", "onnx_precision", "ort_has_cuda", "ort_logits",
    "ort_providers", "ort_session", "tensorrt_available",
]
