"""The README's two commands on a machine without the data: `make test` stops at once with one line."""

from __future__ import annotations

import subprocess

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
