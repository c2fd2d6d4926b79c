"""The factory as a declared pipeline: a new stage is one module and one registry entry, its flags come from
its Config, and the CLI's help and `data` run without the training libraries."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from compression import cli, pipeline
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
    texts = [t for t in ctx.clinc.split("val").texts if len(t.split()) >= cfg.min_words]
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


@pytest.mark.parametrize("name", list(pipeline.STAGES))
def test_every_flag_default_is_its_config_field(name: str) -> None:
    """One place holds each default: the stage's Config (and the pipeline's Common)."""
    module = pipeline.load(pipeline.STAGES[name])
    args = cli.build_parser([name]).parse_args([name])
    for config in (module.Config, pipeline.Common):
        for f in dataclasses.fields(config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            assert getattr(args, f.name) == default, (name, f.name)
    assert callable(module.run_stage)


def test_stage_inputs_are_earlier_stages_and_outputs_are_named_after_them() -> None:
    names = list(pipeline.STAGES)
    for i, stage in enumerate(pipeline.STAGES.values()):
        assert set(stage.inputs) <= set(names[:i]), stage.name
    ctx = pipeline.Context(pipeline.Common(artifacts=Path("art")))
    assert [ctx.dir(n) for n in names] == [Path("art") / n for n in names]


def test_prune_flags_from_its_config() -> None:
    from compression import prune

    args = cli.build_parser(["prune"]).parse_args(["prune", "--ffn-keep", "0.5"])
    assert args.ffn_keep == 0.5
    assert args.recover_epochs == prune.Config().recover_epochs
    assert not hasattr(args, "teacher_epochs")  # only the chosen stage's flags


@pytest.mark.skipif(not (ROOT / ".venv-serve" / "bin" / "python").exists(), reason="needs make serve-venv")
@pytest.mark.parametrize("args", [["--help"], ["data", "--help"]])
def test_help_and_data_run_in_the_serving_environment_without_torch(args: list[str]) -> None:
    python = ROOT / ".venv-serve" / "bin" / "python"
    has_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, check=False).returncode == 0
    assert not has_torch, "the serving environment must not have torch"
    result = subprocess.run(
        [python, "-m", "compression", *args], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m compression" in result.stdout


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
