"""The served graphs' uint8 weights as int8 again, in memory, where this CPU multiplies int8 weights exactly.

The factory stores every int8 weight as uint8 (w + 128, with zero point z + 128: the same numbers), because ONNX
Runtime multiplies uint8 activations by int8 weights with a saturating instruction on CPUs without VNNI, and the
answers then depended on the CPU (compression/unsigned_weights.py). On a CPU with VNNI (or AMX) the int8 products
are exact and take ONNX Runtime's fastest integer kernel, while uint8 weights take a slower one. So at load, one
MatMulInteger whose products saturate where the kernel does (255 x 127, in pairs past int16) is run: if it comes
back exact, each graph's weights are flipped back to int8, which gives the same integer products and so the same
outputs, bit for bit; if not, the stored uint8 graph is loaded as it is. Nothing here guesses the kernel from the
CPU's flags: the probe asks the kernel itself, and app.engine.onnx then asks each graph's own kernels, swapping
in the int8 form only where it gives the stored graph's outputs bit for bit on a few fixed inputs.

The graphs are read and written with a subset of ONNX's protobuf schema built here (the serving install has
protobuf, as ONNX Runtime needs it, but not the onnx package); the fields it does not name pass through intact.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

# Where each op that multiplies by a weight reads it: (weight input, weight zero-point input), for the factory's
# rewrite to uint8 (compression.unsigned_weights) and for the flip back here. DequantizeLinear is there for static
# QDQ graphs, whose weight tables ONNX Runtime fuses into integer matrix products. A quantised embedding lookup
# (Gather on an int8 table) multiplies nothing and keeps its table.
WEIGHT_INPUTS = {"MatMulInteger": (1, 3), "QAttention": (1, 7), "DequantizeLinear": (0, 2)}
SHIFT = 128  # uint8 w + 128 is int8 w; as bytes, w ^ 0x80
UINT8, INT8, INT32 = 2, 3, 6  # onnx.TensorProto.DataType
EXTERNAL = 1  # onnx.TensorProto.DataLocation

# ONNX's field numbers (onnx/onnx.proto) for the messages and fields read or written here.
_SCHEMA: dict[str, list[tuple[str, int, str, str]]] = {
    # message: [(field, number, type, label)]; type is a scalar type or a message name
    "ModelProto": [("ir_version", 1, "int64", "one"), ("graph", 7, "GraphProto", "one"),
                   ("opset_import", 8, "OperatorSetIdProto", "many")],
    "OperatorSetIdProto": [("domain", 1, "string", "one"), ("version", 2, "int64", "one")],
    "GraphProto": [("node", 1, "NodeProto", "many"), ("name", 2, "string", "one"),
                   ("initializer", 5, "TensorProto", "many"), ("input", 11, "ValueInfoProto", "many"),
                   ("output", 12, "ValueInfoProto", "many")],
    "NodeProto": [("input", 1, "string", "many"), ("output", 2, "string", "many"), ("op_type", 4, "string", "one")],
    "TensorProto": [("dims", 1, "int64", "many"), ("data_type", 2, "int32", "one"), ("name", 8, "string", "one"),
                    ("raw_data", 9, "bytes", "one"), ("data_location", 14, "int32", "one")],
    "ValueInfoProto": [("name", 1, "string", "one"), ("type", 2, "TypeProto", "one")],
    "TypeProto": [("tensor_type", 1, "TensorTypeProto", "one")],
    "TensorTypeProto": [("elem_type", 1, "int32", "one"), ("shape", 2, "TensorShapeProto", "one")],
    "TensorShapeProto": [("dim", 1, "Dimension", "many")],
    "Dimension": [("dim_value", 1, "int64", "one"), ("dim_param", 2, "string", "one")],
}  # fmt: skip


def read_roles(nodes: Iterable[tuple[str, Sequence[str]]], names: set[str]) -> dict[str, set[str]]:
    """How the ops (op type, inputs) read each of `names`: "weight" where an op in WEIGHT_INPUTS reads it as its
    weight or zero point, else "<op>:<input>". A table with more than one role cannot change type for one of them;
    the rewrite to uint8 and the flip back both refuse it."""
    roles: dict[str, set[str]] = {}
    for op_type, inputs in nodes:
        for at, name in enumerate(inputs):
            if name in names:
                roles.setdefault(name, set()).add(
                    "weight" if at in WEIGHT_INPUTS.get(op_type, ()) else f"{op_type}:{at}"
                )
    return roles


# The probe, as probe_graph(INT8) writes it (tests/test_signed_weights.py checks that it still does): read as a
# file, so that a CPU whose int8 products are not exact never imports protobuf (3 MB a worker).
PROBE = Path(__file__).with_name("signed_products_probe.onnx")


@functools.cache
def _messages() -> dict[str, Any]:
    """The schema's message classes, in a pool of their own (proto2, as onnx.proto is)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    scalars = {
        "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
        "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
        "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
    }
    package = "intent_onnx_subset"
    file = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto2")
    for message, fields in _SCHEMA.items():
        proto = file.message_type.add(name=message)
        for name, number, kind, label in fields:
            field = proto.field.add(name=name, number=number)
            field.label = (
                descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
                if label == "many"
                else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
            )
            if kind in scalars:
                field.type = scalars[kind]
            else:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
                field.type_name = f".{package}.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}")) for name in _SCHEMA}


def _tensor_type(message: Any, elem_type: int, dims: list[int | None]) -> None:
    message.type.tensor_type.elem_type = elem_type
    for dim in dims:
        entry = message.type.tensor_type.shape.dim.add()
        if dim is None:
            entry.dim_param = "n"
        else:
            entry.dim_value = dim


def probe_graph(weight_type: int) -> bytes:
    """One MatMulInteger: a uint8 input [n, 64] times a constant [64, 4] of 127 (int8) or 255 with zero point 128
    (uint8), which are the same numbers. 255 x 127 in pairs is 64,770, past int16."""
    m = _messages()
    model = m["ModelProto"](ir_version=8)
    model.opset_import.add(domain="", version=13)
    graph = model.graph
    graph.name = "signed_products_probe"
    weights, zero = (np.full(256, 127, np.int8), 0) if weight_type == INT8 else (np.full(256, 255, np.uint8), 128)
    graph.initializer.add(name="w", data_type=weight_type, dims=[64, 4], raw_data=weights.tobytes())
    graph.initializer.add(name="wz", data_type=weight_type, dims=[], raw_data=np.array(zero, weights.dtype).tobytes())
    graph.node.add(op_type="MatMulInteger", input=["a", "w", "", "wz"], output=["y"])
    _tensor_type(graph.input.add(name="a"), UINT8, [None, 64])
    _tensor_type(graph.output.add(name="y"), INT32, [None, 4])
    return bytes(model.SerializeToString())


@functools.cache
def signed_products_exact() -> bool:
    """Whether this process's ONNX Runtime multiplies uint8 by int8 exactly (VNNI, AMX, or a plain widening
    kernel), asked of the kernel itself: once per process."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # no thread pool for one tiny product
    options.log_severity_level = 3
    session = ort.InferenceSession(str(PROBE), options, providers=["CPUExecutionProvider"])
    activations = np.full((1, 64), 255, dtype=np.uint8)
    got = session.run(None, {"a": activations})[0]
    return bool(np.array_equal(got, np.full((1, 4), 255 * 127 * 64, dtype=np.int32)))


def signed_graph(path: Path) -> bytes | None:
    """The graph at `path` with every uint8 weight that an op multiplies by (and its zero point) flipped back to
    int8, byte ^ 0x80: w + 128 -> w. None where there is none to flip, or where a table is stored in a way this
    does not rewrite (not raw bytes, external data, also read by another op): the stored graph is then loaded."""
    model = _messages()["ModelProto"]()
    model.ParseFromString(path.read_bytes())
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    flip: set[str] = set()
    for node in graph.node:
        names = [node.input[at] if at < len(node.input) else "" for at in WEIGHT_INPUTS.get(node.op_type, ())]
        if names and names[0] in initializers and initializers[names[0]].data_type == UINT8:
            if not all(name in initializers and initializers[name].data_type == UINT8 for name in names):
                return None  # a uint8 weight without its stored zero point: not the factory's rewrite
            flip.update(names)
    if not flip or any(len(r) > 1 for r in read_roles(((n.op_type, n.input) for n in graph.node), flip).values()):
        return None  # nothing to flip, or a table that another op also reads, as uint8
    for name in flip:
        tensor = initializers[name]
        size = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        if tensor.data_location == EXTERNAL or len(tensor.raw_data) != size:
            return None
        tensor.raw_data = (np.frombuffer(tensor.raw_data, np.uint8) ^ SHIFT).tobytes()  # w + 128 -> w
        tensor.data_type = INT8
    return bytes(model.SerializeToString())
