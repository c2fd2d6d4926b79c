"""The README's two commands on a machine without the data: `make test` stops at once with one line."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import ROOT


def test_make_test_says_where_the_data_goes_when_it_is_missing(tmp_path) -> None:
    result = subprocess.run(
        ["make", "--no-print-directory", "data-check", f"DATA={tmp_path}/absent.json", f"WIKI={tmp_path}/absent.txt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {tmp_path}/absent.json not found: the tests read CLINC150 from ../shared/")
    assert "make data" in lines[0]


def test_ci_fails_when_pytest_collects_nothing() -> None:
    """pytest's exit 5 (no tests collected) is not success: neither the Makefile nor .ci/run turns it into 0."""
    result = subprocess.run(
        ["make", "--no-print-directory", "test", "PYTEST_ARGS=-k no_test_has_this_name"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "Error 5" in result.stderr


def make_model_dry_run(*variables: str) -> subprocess.CompletedProcess[str]:
    """`make -n model ...`: the commands it would run, printed, none run."""
    return subprocess.run(
        ["make", "-n", "--no-print-directory", "model", "RECIPE=quick", *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_make_model_refuses_a_teams_data_without_out(tmp_path) -> None:
    """Without OUT, a team's file would be built over the committed models/clinc150."""
    result = make_model_dry_run(f"DATA={tmp_path}/team.csv")
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.endswith(
        f"*** DATA={tmp_path}/team.csv needs OUT=dir: without it the build replaces models/clinc150.  Stop."
    )
    given = make_model_dry_run(f"DATA={tmp_path}/team.csv", f"OUT={tmp_path}/mine")
    assert given.returncode == 0
    assert f"--data {tmp_path}/team.csv --wiki" in given.stdout
    assert f"--model-dir {tmp_path}/mine --artifacts artifacts/mine" in given.stdout
    # Neither, or CLINC150's own JSON (what `make data` says to run), rebuilds models/clinc150 as before.
    for variables in ([], [f"DATA={tmp_path}/data_oos_plus.json"]):
        clinc = make_model_dry_run(*variables)
        assert clinc.returncode == 0
        assert ".venv/bin/python -m compression quick --data " in clinc.stdout
        assert "--model-dir" not in clinc.stdout


@pytest.mark.parametrize("name", ["OUT", "DATA"])
def test_make_refuses_a_path_with_a_space_while_it_reads_the_makefile(tmp_path, name: str) -> None:
    """make splits values at whitespace: `OUT="models/my intents"` had reached the build as two arguments."""
    given = {"OUT": f"{tmp_path}/mine", "DATA": f"{tmp_path}/team.csv"}
    given[name] = f"{tmp_path}/my intents"
    result = make_model_dry_run(*(f"{k}={v}" for k, v in given.items()))
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    fix = "name it without spaces" if name == "OUT" else "rename the file without spaces"
    assert line.endswith(f'*** {name}="{tmp_path}/my intents" holds a space, which make splits paths at: {fix}.  Stop.')
