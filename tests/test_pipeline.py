"""The factory as a declared pipeline: a new stage is one module and one registry entry, its flags come from
its Config, and the CLI's help and `data` run without the training libraries."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compression import cli, pipeline
from compression.errors import FactoryError
from compression.records import BEST_PARAMS_FILE
from tests.conftest import ROOT

# The whole of a new stage: one module, written here to a temporary directory.
EXAMPLE_STAGE = """
import json
from dataclasses import dataclass, field


@dataclass
class Config:
    min_words: int = field(default=3, metadata={"help": "shortest query counted"})


def run_stage(ctx, cfg):
    out = ctx.dir("long_queries")
    out.mkdir(parents=True, exist_ok=True)
    texts = [t for t in ctx.dataset.split("val").texts if len(t.split()) >= cfg.min_words]
    (out / "count.json").write_text(json.dumps({"min_words": cfg.min_words, "count": len(texts)}))
"""


@pytest.fixture
def example_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "long_queries_stage.py").write_text(EXAMPLE_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = pipeline.Stage("long_queries", (), "long_queries_stage", "count long validation queries")
    monkeypatch.setitem(pipeline.STAGES, "long_queries", entry)  # the one registry entry
    return entry.name


def test_a_new_stage_is_one_module_and_one_registry_entry(
    example_stage: str, tmp_path: Path, data_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = tmp_path / "art"
    assert cli.main([example_stage, "--data", str(data_path), "--artifacts", str(art), "--min-words", "12"]) == 0
    result = json.loads((art / example_stage / "count.json").read_text())
    val = json.loads(data_path.read_text())
    expected = sum(len(t.split()) >= 12 for t, _ in val["val"] + val["oos_val"])
    assert result == {"min_words": 12, "count": expected}
    # Its Config field is a flag with its default and help.
    args = cli.build_parser([example_stage]).parse_args([example_stage])
    assert args.min_words == 3
    assert (
        "shortest query counted"
        in cli.build_parser([example_stage])._subparsers._group_actions[0].choices[example_stage].format_help()
    )


def _module(name: str) -> pipeline.StageModule:
    """A registered stage's module; a stage whose module another engineer has not added yet is skipped."""
    try:
        return pipeline.load(pipeline.STAGES[name])
    except FactoryError as exc:
        if "is not there" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.mark.parametrize("name", list(pipeline.STAGES))
def test_every_flag_default_is_its_config_field(name: str) -> None:
    """One place holds each default: the stage's Config (and the pipeline's Common)."""
    module = _module(name)
    args = cli.build_parser([name]).parse_args([name])
    for config in (module.Config, pipeline.Common):
        for f in dataclasses.fields(config):
            assert "help" in f.metadata, (name, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            assert getattr(args, f.name) == default, (name, f.name)
    assert callable(module.run_stage)


def test_the_registry_in_order() -> None:
    assert list(pipeline.STAGES) == [
        "teacher",
        "search",
        "distill",
        "prune",
        "export",
        "quantize",
        "embedder",
        "head",
        "oos",
        "static",
        "artifact",
        "bench",
    ]
    # The served transformer is exported from the teacher or the pruned student (--export-from).
    assert pipeline.STAGES["export"].inputs == ("prune", "teacher")
    # The OOS rule reads the pretrained encoder's embedding beside the classifier's logits.
    assert pipeline.STAGES["embedder"].inputs == ()
    # The first stage learns the transformer's answers with the served OOS rule, so it follows the oos stage.
    # The rule sits on a classifier (the full recipe's int8 student, or the quick recipe's head on the embedder).
    assert pipeline.STAGES["head"].inputs == ("embedder",)
    assert pipeline.STAGES["oos"].inputs == ("quantize", "head", "embedder")
    assert pipeline.STAGES["static"].inputs == ("oos",)
    assert pipeline.STAGES["static"].module == "compression.stages.static"
    assert set(pipeline.STAGES["artifact"].inputs) >= {"quantize", "oos", "static"}


def test_no_flag_is_generated_twice() -> None:
    """With `all`, every stage's Config is built from one set of flags: a name used twice would be shared."""
    configs = [pipeline.Common] + [_module(name).Config for name in pipeline.STAGES]
    names = pipeline.flag_names(configs)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    parsed = set().union(*(vars(cli.build_parser([r]).parse_args([r])) for r in pipeline.RECIPES))
    assert parsed >= {n[2:].replace("-", "_") for n in names}  # every stage's flags, in some recipe


def test_each_recipe_runs_registered_stages_in_order_and_sets_only_their_flags() -> None:
    """A recipe's defaults are flags of its own stages (a typo would otherwise be silently ignored), and the command
    line overrides them."""
    order = list(pipeline.STAGES)
    assert set(pipeline.RECIPES) == {"served", "two-encoder", "chapter8", "student", "pruned", "quick"}
    # The two-encoder recipe exports the teacher: no search, distillation or pruning whose students it would not
    # serve.
    two_encoder = ("teacher", "export", "quantize", "embedder", "oos", "static", "artifact", "bench")
    assert pipeline.RECIPES["two-encoder"].stages == two_encoder
    assert cli.build_parser(["two-encoder"]).parse_args(["two-encoder"]).export_from == "teacher"
    assert pipeline.RECIPES["chapter8"].stages == tuple(n for n in order if n != "head")
    # The served recipe is the pruned one with the settings registered for it: no search (its distillation settings
    # are an earlier search's), no pretrained encoder (the student carries its own geometry).
    assert pipeline.RECIPES["served"].stages == pipeline.RECIPES["pruned"].stages
    assert "search" not in pipeline.RECIPES["served"].stages
    assert "embedder" not in pipeline.RECIPES["served"].stages
    served = cli.build_parser(["served"]).parse_args(["served"])
    assert (served.export_from, served.teachers, served.heads_keep, served.ffn_keep) == ("prune", 3, 0.667, 0.25)
    assert (served.recover_geometry_weight, served.static_candidates, served.static_threshold) == (6.0, 4, 0.75)
    pruned = cli.build_parser(["pruned"]).parse_args(["pruned"])
    assert (pruned.teachers, pruned.heads_keep, pruned.static_candidates) == (1, 1.0, 1)
    # CLINC150's in-scope target, which the served recipe sets, is turned off by 0 for a team's data: the rule then
    # refuses --oos-reject-rate of in-scope validation.
    oos_config = _module("oos").Config
    assert oos_config(oos_in_scope_target=served.oos_in_scope_target).threshold_policy() == {"in_scope_accuracy": 0.952}
    team = cli.build_parser(["served"]).parse_args(["served", "--oos-in-scope-target", "0"])
    assert oos_config(oos_in_scope_target=team.oos_in_scope_target).threshold_policy() == {"in_scope_rejection": 0.025}
    assert pipeline.RECIPES["quick"].stages == ("embedder", "head", "oos", "artifact")
    for name, recipe in pipeline.RECIPES.items():
        assert list(recipe.stages) == sorted(recipe.stages, key=order.index), name
        flags = pipeline.flag_names([pipeline.Common] + [_module(s).Config for s in recipe.stages])
        assert {"--" + k.replace("_", "-") for k in recipe.defaults} <= set(flags), name
        args = cli.build_parser([name]).parse_args([name])
        assert all(getattr(args, k) == v for k, v in recipe.defaults.items()), name
    quick = cli.build_parser(["quick"]).parse_args(["quick", "--oos-prototypes", "8"])
    assert (quick.oos_classifier, quick.oos_features, quick.oos_prototypes) == ("head", "student", 8)
    assert not hasattr(quick, "teacher_epochs")  # only the recipe's stages' flags
    assert cli.build_parser(["all"]).parse_args(["all"]).oos_classifier == "quantize"  # all: every stage
    assert pipeline.RECIPE_ALIASES == {"all": "chapter8"}


def test_the_student_recipe_serves_the_unpruned_student_of_layers_1_3_5() -> None:
    """docs/one-small-model.md's best student trade, (e′): no prune stage to run and throw away."""
    student = pipeline.RECIPES["student"]
    assert "prune" not in student.stages
    assert "distill" in student.stages
    args = cli.build_parser(["student"]).parse_args(["student"])
    assert (args.student_layers, args.export_from, args.oos_rule) == ([1, 3, 5], "distill", "energy_knn")


def test_the_pruned_recipe_prunes_the_teachers_six_layers_and_serves_them() -> None:
    """docs/one-small-model.md's ninth session: the distill stage only seeds the student with every teacher layer
    (no epochs), the prune stage cuts its FFNs to a quarter and recovers it, and that is what is exported."""
    pruned = pipeline.RECIPES["pruned"]
    assert pruned.stages == (
        "teacher",
        "distill",
        "prune",
        "export",
        "quantize",
        "oos",
        "static",
        "artifact",
        "bench",
    )
    args = cli.build_parser(["pruned"]).parse_args(["pruned"])
    assert (args.student_layers, args.student_epochs) == ([], 0)  # every teacher layer, as they are
    assert (args.ffn_keep, args.recover_epochs, args.export_from) == (0.25, 6, "prune")
    assert (args.oos_features, args.oos_rule, args.oos_in_scope_target) == ("student", "energy_knn", 0.952)


def test_the_recipes_with_the_students_own_geometry_share_its_settings_and_skip_the_embedder() -> None:
    """The student, pruned and served recipes read the rule's features from the student's geometry head: the same
    rule settings in all three, and no pretrained sentence encoder exported that nothing would read."""
    shared = {"geometry_weight", "transfer_wiki", "oos_features", "oos_prototypes", "oos_rule", "oos_in_scope_target"}
    student, pruned, served = (cli.build_parser([n]).parse_args([n]) for n in ("student", "pruned", "served"))
    assert {k: getattr(student, k) for k in shared} == {k: getattr(pruned, k) for k in shared}
    assert {k: getattr(served, k) for k in shared} == {k: getattr(pruned, k) for k in shared}
    assert (student.oos_features, student.geometry_weight, student.oos_in_scope_target) == ("student", 3.0, 0.952)
    for name in ("student", "pruned", "served"):
        assert "embedder" not in pipeline.RECIPES[name].stages, name
    assert "embedder" in pipeline.RECIPES["two-encoder"].stages  # there the rule reads the pretrained encoder


def test_a_recipe_resumes_from_a_stage_once_the_earlier_ones_left_their_records(tmp_path: Path) -> None:
    names = list(pipeline.RECIPES["student"].stages)
    args = cli.build_parser(["student"]).parse_args(["student", "--from", "distill"])
    assert args.from_stage == "distill"
    with pytest.raises(
        FactoryError, match=r"--from distill: teacher, search left no run\.json under .*; run from teacher$"
    ):
        pipeline.resume(names, "distill", tmp_path)
    for done in ("teacher", "search"):
        (tmp_path / done).mkdir()
        (tmp_path / done / "run.json").write_text("{}")
    assert pipeline.resume(names, "distill", tmp_path) == names[names.index("distill") :]
    assert pipeline.resume(names, "teacher", tmp_path) == names
    with pytest.raises(FactoryError, match=r"--from prune: not a stage of this recipe \(teacher, search, distill, "):
        pipeline.resume(names, "prune", tmp_path)


def test_stage_inputs_are_earlier_stages_and_outputs_are_named_after_them() -> None:
    names = list(pipeline.STAGES)
    for i, stage in enumerate(pipeline.STAGES.values()):
        assert set(stage.inputs) <= set(names[:i]), stage.name
    ctx = pipeline.Context(pipeline.Common(artifacts=Path("art")))
    assert [ctx.dir(n) for n in names] == [Path("art") / n for n in names]


def test_context_has_the_common_options_and_reads_the_data_once(data_path: Path) -> None:
    ctx = pipeline.Context(pipeline.Common(data=data_path, seed=7, model_dir=Path("m"), reports=Path("r")))
    assert (ctx.seed, ctx.threads, ctx.batch_size, ctx.max_length) == (7, 2, 32, 64)
    assert (ctx.artifacts, ctx.model_dir, ctx.reports) == (Path("artifacts"), Path("m"), Path("r"))
    assert (ctx.wiki_oos, ctx.train_subset) == (2000, 0)
    assert ctx.dataset is ctx.dataset
    assert len(ctx.dataset.labels) == 151


def test_prune_flags_from_its_config() -> None:
    from compression.stages import prune

    assert cli.build_parser(["prune"]).parse_args(["prune"]).ffn_keep == prune.Config().ffn_keep
    args = cli.build_parser(["prune"]).parse_args(["prune", "--ffn-keep", "0.5", "--recover-from-student"])
    assert args.ffn_keep == 0.5
    assert args.recover_from_student is True
    assert args.recover_epochs == prune.Config().recover_epochs
    assert not hasattr(args, "teacher_epochs")  # only the chosen stage's flags
    with pytest.raises(SystemExit):
        cli.build_parser(["prune"]).parse_args(["prune", "--teacher-epochs", "1"])


def test_list_and_bool_flags() -> None:
    args = cli.build_parser(["distill"]).parse_args(["distill", "--student-layers", "1,3", "--train-embeddings"])
    assert args.student_layers == [1, 3]
    assert args.train_embeddings is True
    assert cli.build_parser(["bench"]).parse_args(["bench", "--no-baseline"]).baseline is False


def test_a_stage_reads_another_stages_flags_given_in_this_run() -> None:
    from compression.stages import distill

    args = cli.build_parser(["all"]).parse_args(["all", "--alpha", "0.3", "--student-layers", "0,1"])
    ctx = pipeline.Context(pipeline.build(pipeline.Common, args), args)
    cfg = ctx.config_of(distill.Config)
    assert (cfg.alpha, cfg.student_layers, cfg.student_epochs) == (0.3, [0, 1], distill.Config().student_epochs)
    assert pipeline.Context(pipeline.Common()).config_of(distill.Config) == distill.Config()


def test_negative_distillation_epochs_fail_wherever_the_distill_config_is_built() -> None:
    """The check lives with the field: the distill stage, and any stage reading its flags, gets the one-line error."""
    from compression.stages import distill

    with pytest.raises(FactoryError, match=r"^--student-epochs must be at least 0, got -1$"):
        distill.Config(student_epochs=-1)
    args = cli.build_parser(["all"]).parse_args(["all", "--student-epochs", "-1"])
    with pytest.raises(FactoryError, match=r"^--student-epochs must be at least 0, got -1$"):
        pipeline.Context(pipeline.build(pipeline.Common, args), args).config_of(distill.Config)
    assert distill.Config(student_epochs=0).student_epochs == 0  # 0: the teacher's layers as they are


def test_a_negative_geometry_weight_fails_in_one_line_before_anything_trains() -> None:
    from compression.stages import distill

    args = cli.build_parser(["all"]).parse_args(["all", "--geometry-weight", "-3"])
    with pytest.raises(FactoryError, match=r"^--geometry-weight must be at least 0, got -3$"):
        pipeline.Context(pipeline.build(pipeline.Common, args), args).config_of(distill.Config)
    assert distill.Config(geometry_weight=0.0).geometry_weight == 0.0  # 0: a logits-only student


def test_distill_takes_the_search_best_unless_a_flag_sets_it(tmp_path: Path) -> None:
    from compression.stages import distill

    ctx = pipeline.Context(pipeline.Common(artifacts=tmp_path))
    base, train = distill.resolve(ctx, distill.Config())  # no search ran
    assert (base.alpha, base.temperature, train.lr) == (
        distill.FALLBACK_ALPHA,
        distill.FALLBACK_TEMPERATURE,
        distill.FALLBACK_LR,
    )
    ctx.dir("search").mkdir()
    (ctx.dir("search") / BEST_PARAMS_FILE).write_text(json.dumps({"alpha": 0.2, "temperature": 6.0, "lr": 3e-4}))
    base, train = distill.resolve(ctx, distill.Config(temperature=2.0))
    assert (base.alpha, base.temperature, train.lr) == (0.2, 2.0, 3e-4)
    assert (train.seed, train.batch_size, train.max_length) == (ctx.seed, ctx.batch_size, ctx.max_length)


def test_prune_reads_the_softening_from_the_distill_record(tmp_path: Path) -> None:
    from compression.errors import FactoryError
    from compression.records import write_run
    from compression.stages import distill

    with pytest.raises(FactoryError, match="no distillation record"):
        distill.recorded(tmp_path)
    ctx = pipeline.Context(pipeline.Common(artifacts=tmp_path))
    used, _ = distill.resolve(ctx, distill.Config(alpha=0.25, temperature=3.0))
    write_run(tmp_path, "distill", {"distill": dataclasses.asdict(used)}, {})
    assert distill.recorded(tmp_path) == used


def test_the_recovery_takes_the_distillation_geometry_weight_unless_its_flag_sets_it(tmp_path: Path) -> None:
    from compression.records import write_run
    from compression.stages import distill, prune

    ctx = pipeline.Context(pipeline.Common(artifacts=tmp_path))
    used, _ = distill.resolve(ctx, distill.Config(alpha=0.25, temperature=3.0, geometry_weight=3.0))
    ctx.dir("distill").mkdir()
    write_run(ctx.dir("distill"), "distill", {"distill": dataclasses.asdict(used)}, {})
    recorded = prune.resolve(ctx, prune.Config(heads_keep=0.5, hidden_keep=0.75))
    assert (
        recorded.geometry_weight,
        recorded.alpha,
        recorded.temperature,
        recorded.heads_keep,
        recorded.hidden_keep,
    ) == (3.0, 0.25, 3.0, 0.5, 0.75)
    assert prune.resolve(ctx, prune.Config(recover_geometry_weight=6.0)).geometry_weight == 6.0
    assert prune.resolve(ctx, prune.Config(recover_geometry_weight=0.0)).geometry_weight == 0.0  # none, not "unset"
    with pytest.raises(FactoryError, match=r"^--recover-geometry-weight must be at least 0, got -1.0$"):
        prune.Config(recover_geometry_weight=-1.0)


def test_a_registered_stage_without_its_module_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(pipeline.STAGES, "later", pipeline.Stage("later", (), "compression.not_written_yet", "x"))
    assert cli.main(["later"]) == 2
    assert capsys.readouterr().err == "error: stage later: its module compression.not_written_yet is not there\n"


def test_a_bad_flag_of_a_late_stage_fails_before_the_first_stage_runs(
    tmp_path: Path, data_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every stage's settings are checked up front: the static stage's bad pair of flags stops the recipe before
    the teacher trains, and nothing is written."""
    art = tmp_path / "art"
    args = ["pruned", "--data", str(data_path), "--artifacts", str(art), "--static-candidates", "2"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err == "error: static_candidates above 1 needs static_threshold: candidates compare at one cost\n"
    assert not art.exists()


def test_stage_modules_import_without_the_training_libraries() -> None:
    """Reading every stage's Config imports no torch, transformers, onnx or optuna (checked in a fresh process
    of the training environment; the serving environment, which has none of them, is checked below)."""
    code = (
        "import sys\n"
        "from compression import cli, pipeline\n"
        "for s in pipeline.STAGES.values():\n"
        "    pipeline.load(s)\n"
        "cli.build_parser(['all'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'optuna') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(not (ROOT / ".venv-serve" / "bin" / "python").exists(), reason="needs make serve-venv")
@pytest.mark.parametrize(
    "args", [["--help"], ["data", "--help"], ["all", "--help"], ["quick", "--help"], ["distill", "--help"]]
)
def test_help_and_data_run_in_the_serving_environment_without_torch(args: list[str]) -> None:
    python = ROOT / ".venv-serve" / "bin" / "python"
    has_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, check=False).returncode == 0
    assert not has_torch, "the serving environment must not have torch"
    result = subprocess.run(
        [python, "-m", "compression", *args], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m compression" in result.stdout
    if "all" in args:
        assert "--ffn-keep" in result.stdout  # every stage's flags, read from modules that did not need torch


def test_data_downloads_and_verifies_both_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compression import data

    shared = ROOT.parent / "shared" / "data" / "clinc150"
    sources = {data.WIKI_URL: shared / "wiki_sents.txt"}
    original = tmp_path / "original.json"
    original.write_text("not the original")
    sources[data.ORIGINAL_URL] = original

    def fake_fetch(url: str, dest: Path) -> None:
        Path(dest).write_bytes(sources[url].read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlretrieve", fake_fetch)
    with pytest.raises(data.FactoryError, match="downloaded file has sha256"):
        data.download_all(tmp_path / "out")
    assert data.download(tmp_path / "out" / "wiki_sents.txt", data.WIKI_URL, data.WIKI_SHA256).is_file()
    assert not (tmp_path / "out" / "data_oos_plus.json").exists()  # a bad download leaves nothing behind
