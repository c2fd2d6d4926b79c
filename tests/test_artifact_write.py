"""How the factory writes a served model (compression.stages.artifact): built beside its directory and swapped in
whole, so that a build that fails part-way leaves the model there as it was, and a card is never half written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import compression.stages.artifact as artifact_stage
from app.engine.artifact import read_card
from compression.errors import FactoryError
from compression.stages.artifact import replaced_whole, write_card
from tests.conftest import MODEL_DIR, run_cli


def _model(directory: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return files


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


OLD_CARD = b'{"files": {"model.onnx": {}, "oos_stats.npz": {}}}'


def test_a_build_replaces_the_model_directory_whole(tmp_path: Path) -> None:
    """Files the old card named and the new model has not (a rule file of another kind, say) go with it; what
    a team keeps there besides the model, and the model's mode, stay."""
    dest = tmp_path / "models" / "mine"
    _model(dest, {"card.json": OLD_CARD, "model.onnx": b"old", "oos_stats.npz": b"old rule", "report.md": b"old"})
    _model(dest / "notes", {"evaluation.txt": b"the team's"})
    _model(dest, {"NOTES.txt": b"the team's"})
    dest.chmod(0o750)
    with replaced_whole(dest) as building:
        assert building.parent == dest.parent
        assert building.is_dir()
        assert not any(building.iterdir())
        assert (dest / "model.onnx").read_bytes() == b"old"  # served from as it was while the build runs
        new = _model(building, {"card.json": b"new card", "model.onnx": b"new", "report.md": b"new"})
    assert {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()} == {**new, "NOTES.txt": b"the team's"}
    assert _contents(dest / "notes") == {"evaluation.txt": b"the team's"}
    assert dest.stat().st_mode & 0o777 == 0o750
    assert [p.name for p in dest.parent.iterdir()] == ["mine"]  # nothing left beside it


def test_a_build_that_fails_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    old = _model(dest, {"card.json": b"old card", "model.onnx": b"old"})

    def failing_build() -> None:
        with replaced_whole(dest) as building:
            _model(building, {"model.onnx": b"half of a new model"})
            raise FactoryError("the oos stage failed")

    with pytest.raises(FactoryError, match="the oos stage failed"):
        failing_build()
    assert _contents(dest) == old
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_a_model_directory_that_cannot_move_has_its_files_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount point cannot be renamed: its files are replaced one by one, the card last, and the files only the
    old card named are removed. Files it never named stay."""
    dest = tmp_path / "mounted"
    _model(dest, {"card.json": OLD_CARD, "model.onnx": b"old"})
    _model(dest, {"oos_stats.npz": b"old rule", "NOTES.txt": b"the team's"})
    _model(dest / "notes", {"evaluation.txt": b"the team's"})
    renames: list[Path] = []
    rename = os.rename

    def mount_point(source: Path, target: Path) -> None:
        renames.append(Path(source))
        if Path(source) == dest:
            raise OSError(16, "Device or resource busy")
        rename(source, target)

    monkeypatch.setattr(artifact_stage.os, "rename", mount_point)
    with replaced_whole(dest) as building:
        new = _model(building, {"card.json": b'{"files": {"model.onnx": {}}}', "model.onnx": b"new"})
    assert renames == [dest]
    assert {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()} == {**new, "NOTES.txt": b"the team's"}
    assert _contents(dest / "notes") == {"evaluation.txt": b"the team's"}
    assert [p.name for p in tmp_path.iterdir()] == ["mounted"]


def test_a_copy_that_fails_into_a_model_directory_that_cannot_move_leaves_nothing_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No space for the card's copy: the error reaches the build, the old card stays, and neither the temporary
    copy in the directory nor the build's own directory beside it is left behind."""
    dest = tmp_path / "mounted"
    _model(dest, {"card.json": OLD_CARD, "model.onnx": b"old"})
    rename, copyfile = os.rename, artifact_stage.shutil.copyfile

    def mount_point(source: Path, target: Path) -> None:
        if Path(source) == dest:
            raise OSError(16, "Device or resource busy")
        rename(source, target)

    def no_space_for_the_card(source: Path, target: Path) -> None:
        if Path(source).name == "card.json":
            Path(target).write_bytes(b"half a ca")
            raise OSError(28, "No space left on device")
        copyfile(source, target)

    monkeypatch.setattr(artifact_stage.os, "rename", mount_point)
    monkeypatch.setattr(artifact_stage.shutil, "copyfile", no_space_for_the_card)
    with pytest.raises(OSError, match="No space left on device"), replaced_whole(dest) as building:
        _model(building, {"card.json": b'{"files": {"model.onnx": {}}}', "model.onnx": b"new"})
    assert _contents(dest) == {"card.json": OLD_CARD, "model.onnx": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["mounted"]


def test_a_first_build_makes_the_directory_and_a_symlinked_one_is_built_where_it_points(tmp_path: Path) -> None:
    fresh = tmp_path / "a" / "b" / "model"
    with replaced_whole(fresh) as building:
        new = _model(building, {"card.json": b"card"})
    assert _contents(fresh) == new
    target, link = tmp_path / "v3", tmp_path / "current"
    _model(target, {"model.onnx": b"old"})
    link.symlink_to(target)
    with replaced_whole(link) as building:
        new = _model(building, {"model.onnx": b"new"})
    assert link.is_symlink()
    assert link.resolve() == target
    assert _contents(target) == new


def test_a_model_directory_that_is_a_file_is_refused_before_any_stage_runs(tmp_path: Path) -> None:
    """In one line, before the data is trained on, where it had failed at the artifact stage, an hour in."""
    not_a_dir = tmp_path / "model"
    not_a_dir.write_text("a file")
    artifacts = tmp_path / "artifacts"
    result = run_cli("quick", "--model-dir", str(not_a_dir), "--artifacts", str(artifacts), timeout=120)
    assert result.returncode == 2
    message = f"error: {not_a_dir} is not a directory: the model directory (--model-dir, OUT) must be one"
    assert result.stderr.strip() == message
    assert not artifacts.exists()
    assert not_a_dir.read_text() == "a file"


def test_a_card_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed card rewritten with a benchmark row: a failure before the rename leaves the old card and no
    temporary file."""
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "card.json").write_bytes((MODEL_DIR / "card.json").read_bytes())
    card = read_card(directory)
    updated = card.model_copy(update={"benchmark": {"note": "a new row"}})

    def no_rename(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact_stage.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space left on device"):
        write_card(directory, updated)
    assert read_card(directory) == card
    assert [p.name for p in directory.iterdir()] == ["card.json"]
    monkeypatch.undo()
    write_card(directory, updated)
    assert read_card(directory) == updated
    assert [p.name for p in directory.iterdir()] == ["card.json"]


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_a_model_directory_that_holds_the_current_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str
) -> None:
    """Replaced whole, it would carry the whole tree into a new directory and delete the old one from under the
    shell in it."""
    work = tmp_path / "work"
    _model(work, {"intents.csv": b"text,intent\n"})
    monkeypatch.chdir(work)
    with pytest.raises(FactoryError, match=rf"^{out} holds the current directory: the model directory"):
        artifact_stage.check_model_dir(Path(out))
    artifact_stage.check_model_dir(Path("models/my-intents"))  # one of its own, below it, is fine
    assert sorted(p.name for p in work.iterdir()) == ["intents.csv"]


def test_a_build_stopped_by_sigterm_leaves_nothing_beside_the_model(tmp_path: Path) -> None:
    """What `timeout`, CI runners and `docker stop` send: the half-built directory goes, as a failed build's does
    (by default the process died where it stood, and left it beside the model for good)."""
    import signal
    import time

    from compression.cli import sigterm_as_exit

    before = signal.getsignal(signal.SIGTERM)
    dest = tmp_path / "mine"
    old = _model(dest, {"card.json": b"old card", "model.onnx": b"old"})

    def stopped_build() -> None:
        with sigterm_as_exit(), replaced_whole(dest) as building:
            _model(building, {"model.onnx": b"half of a new model"})
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the signal's handler raises before this ends

    with pytest.raises(SystemExit) as stopped:
        stopped_build()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert _contents(dest) == old
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert signal.getsignal(signal.SIGTERM) == before  # the block's handler goes with it


def test_a_file_that_cannot_be_carried_over_is_one_line_and_leaves_nothing_beside_the_model(tmp_path: Path) -> None:
    """A named pipe a team left in OUT: a SpecialFileError traceback had left the half-built directory for good."""
    dest = tmp_path / "mine"
    old = _model(dest, {"card.json": b"old card", "model.onnx": b"old", "notes.txt": b"the team's"})
    os.mkfifo(dest / "pipe")
    with pytest.raises(FactoryError) as refused, replaced_whole(dest) as building:
        _model(building, {"card.json": b"new card", "model.onnx": b"new"})
    assert str(refused.value) == (
        f"{dest / 'pipe'} cannot be carried over into the new model: `{dest / 'pipe'}` is a named pipe; move it "
        f"out of {dest}"
    )
    assert {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()} == old
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_a_build_stopped_by_sigterm_while_carrying_over_leaves_nothing_beside_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The carry-over of a team's files (hundreds of MB, say) ran outside the clean-up: a SIGTERM then left the
    half-built directory beside the model."""
    import shutil
    import signal

    from compression.cli import sigterm_as_exit

    dest = tmp_path / "mine"
    old = _model(dest, {"card.json": b"old card", "model.onnx": b"old", "recording.bin": b"the team's"})

    def copy_stopped(src: Path, dst: Path, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises SystemExit here, as it does mid-copy

    monkeypatch.setattr(shutil, "copy2", copy_stopped)
    with pytest.raises(SystemExit), sigterm_as_exit(), replaced_whole(dest) as building:
        _model(building, {"card.json": b"new card", "model.onnx": b"new"})
    assert _contents(dest) == old
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
