"""ONNX graph surgery for the feature-space OOS rules: a features output from the classifier's own graph, or from
a second encoder joined to it, and a gate that runs that encoder only where its answer can matter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compression.errors import FactoryError

FEATURES_OUTPUT = "features"
# student: the exported student's own features output (its geometry head, compression.geometry); mean and pooled
# come from the classifier's own graph by surgery; embedder from a second encoder's (add_encoder_output).
FEATURE_SOURCES = ("student", "mean", "pooled", "embedder")
CLASSIFIER_SOURCES = ("mean", "pooled")
# The names of a joined encoder's nodes and tensors (add_encoder_output), which gate_encoder_output finds by it.
ENCODER_PREFIX = "embedder/"
# The classifier's own matrix product, found by walking back from the logits; after dynamic quantisation its
# float input is the input of a DynamicQuantizeLinear.
_PRODUCTS = ("MatMul", "Gemm", "MatMulInteger")
_PASS_THROUGH = ("Add", "Mul", "Cast")


def _classifier_input(producer: dict[str, Any], logits: str, where: str) -> str:
    """The float tensor a classification head multiplies, walking back from `logits`."""
    tensor, node = logits, producer.get(logits)
    while node is not None and node.op_type in _PASS_THROUGH:
        tensor = node.input[0]
        node = producer.get(tensor)
    if node is None or node.op_type not in _PRODUCTS:
        raise FactoryError(f"{where}: no matrix product found above '{logits}'")
    feature = node.input[0]
    quantizer = producer.get(feature)
    if quantizer is not None and quantizer.op_type == "DynamicQuantizeLinear":
        feature = quantizer.input[0]
    return str(feature)


def has_output(path: Path, name: str = FEATURES_OUTPUT) -> bool:
    import onnx

    return any(o.name == name for o in onnx.load(str(path), load_external_data=False).graph.output)


def add_features_output(
    src: Path, dest: Path, source: str = "mean", logits: str = "logits", name: str = FEATURES_OUTPUT
) -> None:
    """Copy the ONNX model at `src` to `dest` with a second output, `name` ([batch, D]):
    - `pooled`: the classifier's input (for BERT, the pooler's tanh of the first token);
    - `mean`: the encoder's last hidden states averaged over the attention mask and scaled to unit length,
      the sentence embedding all-MiniLM-L6-v2 was trained to give (found as what the pooler reads).
    The logits are computed as before; `mean` adds a few element-wise ops over one [seq, D] tensor."""
    import onnx
    from onnx import TensorProto, helper

    if source not in CLASSIFIER_SOURCES:
        raise FactoryError(f"feature source must be one of {', '.join(CLASSIFIER_SOURCES)}, got {source!r}")
    model = onnx.load(str(src))
    graph = model.graph
    drop_output(graph, name)  # a student's own features give way
    producer = {out: node for node in graph.node for out in node.output}
    feature = _classifier_input(producer, logits, src.name)
    if source == "pooled":
        graph.node.append(helper.make_node("Identity", [feature], [name], name=f"{name}_output"))
    else:
        # tanh <- pooler product <- first token's hidden state <- Gather(sequence output).
        pre = producer.get(feature)
        if pre is None or pre.op_type != "Tanh":
            raise FactoryError(f"{src.name}: no pooler (Tanh) under the classifier")
        first_token = _classifier_input(producer, pre.input[0], src.name)
        gather = producer.get(first_token)
        if gather is None or gather.op_type != "Gather":
            raise FactoryError(f"{src.name}: the pooler does not read one token of the sequence output")
        hidden = gather.input[0]
        p = f"{name}_"
        graph.node.extend(
            [
                helper.make_node("Cast", ["attention_mask"], [p + "mask"], to=TensorProto.FLOAT),
                helper.make_node("Unsqueeze", [p + "mask", p + "last_axis"], [p + "mask3"]),
                helper.make_node("Mul", [hidden, p + "mask3"], [p + "masked"]),
                helper.make_node("ReduceSum", [p + "masked", p + "seq_axis"], [p + "sum"], keepdims=0),
                helper.make_node("ReduceSum", [p + "mask3", p + "seq_axis"], [p + "count"], keepdims=0),
                helper.make_node("Div", [p + "sum", p + "count"], [p + "mean"]),
                helper.make_node("ReduceL2", [p + "mean"], [p + "norm"], axes=[-1], keepdims=1),
                helper.make_node("Div", [p + "mean", p + "norm"], [name]),
            ]
        )
        graph.initializer.extend(
            [
                onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), p + "last_axis"),
                onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), p + "seq_axis"),
            ]
        )
    graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", None]))
    onnx.save(model, str(dest))


def drop_output(graph: Any, name: str) -> None:
    """Remove the graph output `name`, where there is one, and every node only it needed."""
    kept = [o for o in graph.output if o.name != name]
    if len(kept) == len(graph.output):
        return
    del graph.output[:]
    graph.output.extend(kept)
    prune_dead_nodes(graph)


def prune_dead_nodes(graph: Any) -> None:
    """Drop the nodes none of whose outputs is read, by a node or as a graph output, until none is left."""
    while True:
        needed = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in needed for o in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def add_encoder_output(src: Path, encoder: Path, dest: Path, name: str = FEATURES_OUTPUT) -> None:
    """Copy the classifier at `src` to `dest` with a second output, `name`: the first output of the ONNX
    encoder at `encoder`, which reads the same inputs. One graph keeps the service's one session and one call
    per query; the encoder's names get a prefix, so that nothing of the classifier is shadowed."""
    import onnx
    from onnx import compose

    model, other = onnx.load(str(src)), onnx.load(str(encoder))
    inputs = {i.name for i in model.graph.input}
    wanted = [i.name for i in other.graph.input]
    if not set(wanted) <= inputs:
        raise FactoryError(f"{encoder.name} reads {', '.join(sorted(set(wanted) - inputs))}, which {src.name} lacks")
    ours = {o.domain: o.version for o in model.opset_import}
    for o in other.opset_import:
        if ours.setdefault(o.domain, o.version) != o.version:
            raise FactoryError(f"{encoder.name} uses opset {o.version} of '{o.domain}', {src.name} {ours[o.domain]}")
    prefix = ENCODER_PREFIX
    other = compose.add_prefix(other, prefix)
    shared = {prefix + n: n for n in wanted}  # the encoder reads the classifier's own inputs
    for node in other.graph.node:
        node.input[:] = [shared.get(i, i) for i in node.input]
    produced = other.graph.output[0].name
    drop_output(model.graph, name)  # a student's own features give way to the encoder's
    model.graph.node.extend(other.graph.node)
    model.graph.node.append(onnx.helper.make_node("Identity", [produced], [name], name=f"{name}_output"))
    model.graph.initializer.extend(other.graph.initializer)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", None]))
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in ours.items())
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))


GATE_PREFIX = "gate/"


def gate_encoder_output(src: Path, dest: Path, energy_floor: float, sentinel: np.ndarray) -> None:
    """Copy the joined graph at `src` (add_encoder_output) to `dest` with the encoder run only where it can
    change the answer: where the classifier's energy (log-sum-exp of its logits) is under `energy_floor`.
    Elsewhere the features output is `sentinel`, a stored in-scope training query's embedding, so that a
    nearest-neighbour rule sees a perfect match: those rows are answered as the logits say. The encoder's
    nodes move into an ONNX `If`, which ONNX Runtime skips when no row of the batch needs them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    prefix = ENCODER_PREFIX
    output = next((n for n in graph.node if n.output and n.output[0] == FEATURES_OUTPUT), None)
    encoder = [n for n in graph.node if n.output and all(o.startswith(prefix) for o in n.output)]
    if output is None or not encoder or any(n.op_type == "If" for n in graph.node):
        raise FactoryError(f"{src.name}: not a classifier joined with an encoder, or already gated")
    rest = [n for n in graph.node if n is not output and n not in encoder]
    embedding = output.input[0]
    g = GATE_PREFIX
    then_branch = helper.make_graph(
        encoder, "encode", [], [helper.make_tensor_value_info(embedding, TensorProto.FLOAT, None)]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", [g + "sentinel"], [g + "skipped"])],
        "skip",
        [],
        [helper.make_tensor_value_info(g + "skipped", TensorProto.FLOAT, None)],
    )
    gate = [
        helper.make_node("ReduceLogSumExp", ["logits"], [g + "energy"], axes=[-1], keepdims=0),
        helper.make_node("Less", [g + "energy", g + "floor"], [g + "needed"]),
        helper.make_node("Cast", [g + "needed"], [g + "needed_int"], to=TensorProto.INT32),
        helper.make_node("ReduceMax", [g + "needed_int"], [g + "any_int"], keepdims=0),
        helper.make_node("Cast", [g + "any_int"], [g + "any"], to=TensorProto.BOOL),
        helper.make_node("If", [g + "any"], [g + "embedding"], then_branch=then_branch, else_branch=else_branch),
        # Per row, so that a row's answer never depends on the batch it came in.
        helper.make_node("Unsqueeze", [g + "needed", g + "axis"], [g + "needed_column"]),
        helper.make_node("Where", [g + "needed_column", g + "embedding", g + "sentinel"], [FEATURES_OUTPUT]),
    ]
    del graph.node[:]
    graph.node.extend(rest + gate)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(energy_floor, dtype=np.float32), g + "floor"),
            numpy_helper.from_array(sentinel.reshape(1, -1).astype(np.float32), g + "sentinel"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), g + "axis"),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
