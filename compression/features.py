"""The transformer's pooled features, for the feature-space OOS rules: a second graph output, and the
classes' statistics fitted on the training split (app.oos.FeatureStats)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.oos import FeatureStats
from compression.errors import FactoryError

FEATURES_OUTPUT = "features"
# The classifier's own matrix product, found by walking back from the logits; after dynamic quantisation its
# float input is the input of a DynamicQuantizeLinear.
_PRODUCTS = ("MatMul", "Gemm", "MatMulInteger")
_PASS_THROUGH = ("Add", "Mul", "Cast")
# Ridge added to the shared covariance, as a share of its mean variance: pooled features can be nearly
# collinear (the pooler's tanh saturates), and the inverse must stay well conditioned.
RIDGE = 1e-3


def add_features_output(src: Path, dest: Path, logits: str = "logits", name: str = FEATURES_OUTPUT) -> int:
    """Copy the ONNX model at `src` to `dest` with the classifier's input as a second output, `name`
    ([batch, D]); returns D. The graph's arithmetic is unchanged: the tensor is already computed."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    tensor, node = logits, producer.get(logits)
    while node is not None and node.op_type in _PASS_THROUGH:
        tensor = node.input[0]
        node = producer.get(tensor)
    if node is None or node.op_type not in _PRODUCTS:
        raise FactoryError(f"{src.name}: no classifier product found above '{logits}'")
    feature = node.input[0]
    quantizer = producer.get(feature)
    if quantizer is not None and quantizer.op_type == "DynamicQuantizeLinear":
        feature = quantizer.input[0]
    weight = node.input[1]
    init = {i.name: i for i in graph.initializer}
    if weight not in init:
        raise FactoryError(f"{src.name}: the classifier's weight {weight} is not a constant")
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
    dim = int(init[weight].dims[1] if trans_b else init[weight].dims[0])  # the weight is [D, C], or [C, D]
    identity = helper.make_node("Identity", [feature], [name], name=f"{name}_output")
    graph.node.append(identity)
    graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", dim]))
    onnx.save(model, str(dest))
    return dim


def fit_stats(features: np.ndarray, labels: np.ndarray, ridge: float = RIDGE) -> FeatureStats:
    """Class means and the inverse of the covariance they share (the pooled within-class covariance plus a
    small ridge), whitened: see FeatureStats. `labels` index the classes 0..K-1 of `features`' rows."""
    features = features.astype(np.float64)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise FactoryError("feature statistics need at least two classes")
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    cov = centred.T @ centred / (len(features) - len(classes))
    cov += ridge * float(np.trace(cov)) / cov.shape[0] * np.eye(cov.shape[0])
    whiten = np.linalg.cholesky(np.linalg.inv(cov))  # P = L L^T, so |x L|^2 = x P x^T
    return FeatureStats(whiten=whiten.astype(np.float32), centers=(means @ whiten).astype(np.float32))
