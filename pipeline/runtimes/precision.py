"""Precision of an ONNX model, read from its own types, and the fp32 -> fp16 conversion.

TensorRT builds strongly typed networks (always on in TensorRT 11, which removed the precision
builder flags): a layer runs in the type the model gives it. So FP16 comes from an FP16 ONNX
model and INT8 from an explicitly quantized one (QuantizeLinear/DequantizeLinear nodes, "Q/DQ").

The conversion uses ONNX Runtime's ``onnxruntime.transformers.float16`` (shipped with the
``onnxruntime`` wheel the project already needs) rather than graph surgery of our own: weights
and compute become float16, a few ops that lose too much stay in float32 (its default block
list), and the graph's inputs and outputs stay float32 behind Cast nodes, so every caller still
feeds float32 images and reads float32 logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pipeline.runtimes.errors import ConversionError

Precision = Literal["fp32", "fp16", "int8"]
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def load_onnx(onnx_model: bytes | str | Path | Any) -> Any:
    """The ``onnx.ModelProto`` of a file, its bytes, or a ModelProto (returned as is). Bytes that
    are not an ONNX model are a ConversionError."""
    import onnx
    from google.protobuf.message import DecodeError

    if isinstance(onnx_model, onnx.ModelProto):
        return onnx_model
    data = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    try:
        proto = onnx.load_from_string(data)
    except DecodeError as err:
        raise ConversionError(f"cannot parse the ONNX model: {err}") from None
    if not proto.graph.node:
        raise ConversionError("cannot parse the ONNX model: its graph has no nodes")
    return proto


def onnx_precision(onnx_model: bytes | str | Path | Any) -> Precision:
    """What a strongly typed build of the model runs in: ``int8`` when it has Q/DQ nodes
    (explicit quantization), ``fp16`` when its weights or a Cast are float16, else ``fp32``."""
    import onnx

    proto = load_onnx(onnx_model)
    nodes = list(proto.graph.node)
    if any(n.op_type in QDQ_OPS for n in nodes):
        return "int8"
    half = onnx.TensorProto.FLOAT16
    if any(t.data_type == half for t in proto.graph.initializer):
        return "fp16"
    for n in nodes:
        if n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute):
            return "fp16"
        if n.op_type == "Constant" and any(a.t.data_type == half for a in n.attribute if a.type == a.TENSOR):
            return "fp16"
    return "fp32"


def convert_to_fp16(onnx_model: bytes | str | Path | Any) -> bytes:
    """The fp16 version of an fp32 ONNX model, as bytes: float16 weights and compute, inputs and
    outputs still float32 (Cast nodes at the boundary), nodes topologically sorted (the
    converter appends its input Casts at the end; TensorRT's parser and ``onnx.checker`` want
    them in order), checked with ``onnx.checker``. An fp16 model is returned unchanged; a Q/DQ
    model is a ConversionError (its precision is int8). The argument is not modified."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = load_onnx(onnx_model)
    kind = onnx_precision(proto)
    if kind == "fp16":
        return proto.SerializeToString()
    if kind == "int8":
        raise ConversionError("the ONNX model is explicitly quantized (Q/DQ nodes): it builds as int8, not fp16")
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # the converter edits the model it is given
    half = convert_float_to_float16(copy, keep_io_types=True)
    OnnxModel.graph_topological_sort(half.graph)
    try:
        onnx.checker.check_model(half, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ConversionError(f"the fp16 conversion of the ONNX model fails onnx.checker: {err}") from None
    return half.SerializeToString()
