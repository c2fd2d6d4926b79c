"""Settings and the model card read strictly, and as operators write them: a log level in any case, a warning for
more intra-op threads than cores, and a card version that can go into answers, metrics labels and log lines."""

from __future__ import annotations

import errno
import json
import logging
import signal
import tempfile
import time
from pathlib import Path

import pytest

import app.__main__ as entry
from app import config
from app.__main__ import settings_or_error
from app.config import Settings
from app.engine.artifact import read_card
from app.engine.errors import ModelLoadError
from tests.conftest import MODEL_DIR

LEVEL_REFUSED = "invalid setting INTENT_LOG_LEVEL: Input should be 'debug', 'info', 'warning' or 'error'"


@pytest.fixture(autouse=True)
def no_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Away from any .env, with none of the variables these tests set already set (`make test` exports some)."""
    monkeypatch.chdir(tmp_path)
    for name in ("INTENT_LOG_LEVEL", "INTENT_WORKERS", "INTENT_ORT_INTRA_THREADS", "INTENT_RELOAD_RETRY_S"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("value", "level"),
    [
        ("INFO", "info"),
        ("Info", "info"),
        ("info", "info"),
        ("DEBUG", "debug"),
        ("Warning", "warning"),
        ("ERROR", "error"),
    ],
)
def test_a_log_level_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch, value: str, level: str) -> None:
    """Python's logging and uvicorn spell levels in upper case; INFO had stopped start-up."""
    monkeypatch.setenv("INTENT_LOG_LEVEL", value)
    settings = settings_or_error()
    assert isinstance(settings, Settings)
    assert settings.log_level == level


@pytest.mark.parametrize("value", [" info", "INFO ", "info\n", "in fo", "", "verbose", "CRITICAL", "warn"])
def test_a_log_level_with_spaces_or_that_is_no_level_is_still_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("INTENT_LOG_LEVEL", value)
    assert settings_or_error() == LEVEL_REFUSED


@pytest.mark.parametrize(
    ("workers", "intra", "warning"),
    [
        (4, 1, None),
        (2, 2, None),
        (0, 2, None),  # one worker per two cores: 2 x 2
        (1, 1, None),
        (
            5,
            1,
            "INTENT_WORKERS 5 x INTENT_ORT_INTRA_THREADS 1 is 5 threads on 4 CPUs: each waits for a core and latency "
            "rises; lower either, or unset INTENT_WORKERS for one worker per core",
        ),
        (
            4,
            2,
            "INTENT_WORKERS 4 x INTENT_ORT_INTRA_THREADS 2 is 8 threads on 4 CPUs: each waits for a core and latency "
            "rises; lower either, or unset INTENT_WORKERS for one worker per core",
        ),
        (
            0,
            6,
            "INTENT_WORKERS 1 x INTENT_ORT_INTRA_THREADS 6 is 6 threads on 4 CPUs: each waits for a core and latency "
            "rises; lower either, or unset INTENT_WORKERS for one worker per core",
        ),
    ],
)
def test_more_intra_op_threads_than_cores_is_a_warning_not_a_refusal(
    monkeypatch: pytest.MonkeyPatch, workers: int, intra: int, warning: str | None
) -> None:
    """Workers x intra-op threads over the cores the process may use had been accepted in silence, and latency
    collapsed; an operator may oversubscribe on purpose, so start-up goes on and says so."""
    monkeypatch.setattr(config, "effective_cpus", lambda: 4)
    monkeypatch.setenv("INTENT_WORKERS", str(workers))
    monkeypatch.setenv("INTENT_ORT_INTRA_THREADS", str(intra))
    settings = settings_or_error()
    assert isinstance(settings, Settings)
    assert settings.oversubscription() == warning


def test_start_up_logs_the_oversubscription_once_and_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`python -m app` logs the warning before it starts the workers, and starts them."""
    monkeypatch.setattr(config, "effective_cpus", lambda: 1)
    monkeypatch.setenv("INTENT_WORKERS", "2")
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main's own handlers stay out of pytest's process
    monkeypatch.setattr(entry, "configure_logging", lambda level: None)  # caplog's handler stays
    monkeypatch.setattr(entry, "address_problem", lambda host, port: None)
    monkeypatch.setattr(entry, "check_in_child", lambda settings: None)
    started: list[int] = []
    monkeypatch.setattr(entry, "run_workers", lambda settings, factory: started.append(settings.workers) or 0)
    with caplog.at_level(logging.WARNING, logger="app"):
        assert entry.main() == 0
    assert started == [2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "INTENT_WORKERS 2 x INTENT_ORT_INTRA_THREADS 1 is 2 threads on 1 CPUs: each waits for a core and latency "
        "rises; lower either, or unset INTENT_WORKERS for one worker per core"
    ]


@pytest.mark.parametrize(("value", "read"), [(None, 30.0), ("0.05", 0.05), ("3600", 3600.0)])
def test_the_reload_retry_is_read_within_its_bounds(
    monkeypatch: pytest.MonkeyPatch, value: str | None, read: float
) -> None:
    if value is not None:
        monkeypatch.setenv("INTENT_RELOAD_RETRY_S", value)
    settings = settings_or_error()
    assert isinstance(settings, Settings)
    assert settings.reload_retry_s == read


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("0", "Input should be greater than 0"),
        ("-1", "Input should be greater than 0"),
        ("3601", "Input should be less than or equal to 3600"),
        ("inf", "Input should be less than or equal to 3600"),
        ("nan", "Input should be less than or equal to 3600"),
        ("soon", "Input should be a valid number, unable to parse string as a number"),
    ],
)
def test_a_reload_retry_out_of_bounds_is_refused(monkeypatch: pytest.MonkeyPatch, value: str, why: str) -> None:
    monkeypatch.setenv("INTENT_RELOAD_RETRY_S", value)
    assert settings_or_error() == f"invalid setting INTENT_RELOAD_RETRY_S: {why}"


@pytest.mark.parametrize("admin_key", [None, "k"])
def test_no_writable_temporary_directory_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], admin_key: str | None
) -> None:
    """Two workers share a metrics directory, and with /admin/reload a pointer file, both made in the temporary
    directory: a read-only root without a tmpfs had ended start-up with a traceback."""

    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("INTENT_MODEL_POINTER", raising=False)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(entry.uvicorn, "run", lambda *args, **kwargs: pytest.fail("started"))
    settings = Settings(workers=2 if admin_key is None else 1, admin_key=admin_key)
    assert entry.run_workers(settings, entry.APP_FACTORY) == 1
    assert capsys.readouterr().err == (
        f"error: no writable temporary directory ({tempfile.gettempdir()}: Read-only file system); the workers share "
        "their metrics and reloads through one: mount a writable /tmp (an emptyDir, a tmpfs) or set TMPDIR\n"
    )


def card_with_version(directory: Path, version: str) -> Path:
    """The committed card under another version, alone in `directory` (read_card reads nothing else)."""
    card = json.loads((MODEL_DIR / "card.json").read_text())
    card["version"] = version
    (directory / "card.json").write_text(json.dumps(card))
    return directory


@pytest.mark.parametrize(
    "version",
    [
        json.loads((MODEL_DIR / "card.json").read_text())["version"],
        f"{time.strftime('%Y.%m.%d')}-8e82d3c5",  # the factory's form (compression.stages.artifact)
        "tiny-1",
        "2026.12.01-rollout",
        "fuzz-2026.a",
        "9999.outside",
        "va",
        "1.0+local_2",
        "v" * 100,
    ],
)
def test_a_card_version_of_letters_digits_and_punctuation_is_read(tmp_path: Path, version: str) -> None:
    assert read_card(card_with_version(tmp_path, version)).version == version


@pytest.mark.parametrize(
    "version",
    ["v 1", "v1\n", "v1\r\nX-Injected: 1", "v1\t", "v\x001", "v\x1b[31m", "vé", "-v1", ".v1", "v1/../x", 'v1"'],
)
def test_a_card_version_with_spaces_or_control_characters_is_refused(tmp_path: Path, version: str) -> None:
    """It goes into every answer (model_version), a metrics label and log lines."""
    with pytest.raises(ModelLoadError) as refused:
        read_card(card_with_version(tmp_path, version))
    assert str(refused.value) == (
        f"invalid {tmp_path / 'card.json'}: version: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._+-]*$'"
    )


@pytest.mark.parametrize("variable", ["INTENT_API_KEY", "INTENT_ADMIN_KEY"])
@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("s3cret\n", "has leading or trailing whitespace (a file's final newline?): remove it"),
        (" s3cret", "has leading or trailing whitespace (a file's final newline?): remove it"),
        ("s3cret\r\n", "has leading or trailing whitespace (a file's final newline?): remove it"),
        ("s3 cret", "holds a character that is not visible ASCII, which no Authorization header carries"),
        ("s3\tcret", "holds a character that is not visible ASCII, which no Authorization header carries"),
        ("s3crét", "holds a character that is not visible ASCII, which no Authorization header carries"),
        ("s3\x7fcret", "holds a character that is not visible ASCII, which no Authorization header carries"),
    ],
    ids=["newline", "leading-space", "crlf", "inner-space", "tab", "non-ascii", "del"],
)
def test_a_key_no_client_can_send_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, variable: str, key: str, why: str
) -> None:
    """A key read with its secret file's final newline had been taken, and every request answered 401."""
    monkeypatch.setenv(variable, key)
    assert settings_or_error() == f"invalid setting {variable}: {why}"


def test_a_key_of_visible_ascii_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTENT_API_KEY", "s3cret-!~._+/=")
    settings = settings_or_error()
    assert isinstance(settings, Settings)
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "s3cret-!~._+/="


@pytest.mark.parametrize("name", ["INTENT_MAX_QUEU", "intent_max_queu"])
def test_a_mistyped_name_in_the_settings_file_stops_start_up(tmp_path: Path, name: str) -> None:
    """Only the environment's names had been checked: a typo in .env was ignored, its default served in silence."""
    (tmp_path / ".env").write_text(f"# ours\nINTENT_PORT=8745\n{name}=5\n")
    assert settings_or_error() == (
        f"invalid settings: {name} in .env is not a setting (did you mean INTENT_MAX_QUEUE?); remove it, or see the "
        "README's Configuration"
    )


def test_the_body_limit_must_hold_the_largest_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """As JSON with \\uXXXX escapes, 6 bytes a character; a batch within the other limits had been refused 413."""
    for name in ("INTENT_MAX_BATCH", "INTENT_MAX_TEXT_CHARS"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().max_body_bytes >= config.batch_body_bytes(64, 1000) == 384_320
    monkeypatch.setenv("INTENT_MAX_BODY_BYTES", "262144")
    assert settings_or_error() == (
        "invalid settings: INTENT_MAX_BODY_BYTES 262144 is under the 384320 bytes of the largest batch "
        "(INTENT_MAX_BATCH 64 x INTENT_MAX_TEXT_CHARS 1000, as JSON escapes): raise it, or lower either"
    )
    monkeypatch.setenv("INTENT_MAX_BATCH", "40")
    assert isinstance(settings_or_error(), Settings)
