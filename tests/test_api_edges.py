"""Edge cases through the full app (lifespan running) with a fake classifier."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.engine.engine import WARMUP_TEXTS
from app.http.main import create_app
from loadtest.driver import server_timings
from tests.fakes import FakeClassifier, fake_factory


def make_client(clf: FakeClassifier | None = None, **settings: object) -> TestClient:
    s = Settings(warmup_queries=0, **settings)  # type: ignore[arg-type]
    return TestClient(create_app(s, fake_factory(clf or FakeClassifier())))


@pytest.fixture
def client():
    with make_client() as c:
        yield c


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message"}
    return body["error"]["type"]


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b'{"text": ""}', 422, "empty_text"),
        (b'{"text": "   \\t\\n "}', 422, "empty_text"),
        (b'{"text": "\\u200b\\u200d"}', 422, "empty_text"),
        (b'{"text": 42}', 422, "validation_error"),
        (b'{"text": null}', 422, "validation_error"),
        (b'{"text": ["a"]}', 422, "validation_error"),
        (b'{"txt": "hello"}', 422, "validation_error"),
        (b'{"text": "hi", "top_k": 0}', 422, "validation_error"),
        (b'{"text": "hi", "top_k": "3"}', 422, "validation_error"),
        (b'{"text": "hi", "top_k": 11}', 422, "validation_error"),
        (b'["text"]', 422, "validation_error"),
        (b"", 400, "invalid_json"),
        (b"{not json", 400, "invalid_json"),
        (b'{"text": "caf\xe9"}', 400, "invalid_encoding"),
        (b"\xff\xfe\x00", 400, "invalid_encoding"),
    ],
)
def test_bad_single_inputs(client: TestClient, body: bytes, status: int, kind: str) -> None:
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert error_of(r) == kind


DIRECT_PATH_CASES = [
    b'{"text": "book a flight to rome"}',
    b'{"text": "balance please", "top_k": 2}',
    b'{"text": ""}',
    b'{"text": 42}',
    b"{not json",
    b"\xff\xfe\x00",
    b'{"text": "' + b"x" * 1001 + b'"}',
]


def test_direct_predict_path_answers_exactly_like_the_fastapi_route() -> None:
    """With CORS on, POST /predict goes through FastAPI's router; off, the middleware answers it.
    Both must give the same status, body and headers for the same request."""

    def answers(**settings: object) -> list[tuple[int, bytes, str, bool]]:
        with make_client(**settings) as c:
            out = []
            for body in DIRECT_PATH_CASES:
                r = c.post("/predict", content=body, headers={"content-type": "application/json"})
                out.append((r.status_code, r.content, r.headers["content-type"], "x-request-id" in r.headers))
            return out

    direct = answers()
    routed = answers(cors_origins=["https://x.example"])
    assert [a[0] for a in direct] == [200, 200, 422, 422, 400, 400, 422]
    assert direct == routed


def test_cors_headers_on_predict_when_configured() -> None:
    with make_client(cors_origins=["https://x.example"]) as c:
        r = c.post("/predict", json={"text": "flight to rome"}, headers={"origin": "https://x.example"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://x.example"
        # A page's script may read the request id and the timings (a browser hides other headers from it).
        assert r.headers["access-control-expose-headers"] == "server-timing, x-request-id"


def test_text_over_char_limit(client: TestClient) -> None:
    r = client.post("/predict", json={"text": "a" * 1001})
    assert r.status_code == 422
    assert error_of(r) == "text_too_long"
    assert client.post("/predict", json={"text": "a" * 1000}).status_code == 200


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ({"texts": []}, "validation_error"),
        ({"texts": "one"}, "validation_error"),
        ({"texts": ["ok", 3]}, "validation_error"),
        ({"texts": ["ok", " "]}, "empty_text"),
        ({"texts": ["ok", "x" * 1001]}, "text_too_long"),
        ({"texts": ["t"] * 65}, "batch_too_large"),
    ],
)
def test_bad_batches(client: TestClient, payload: dict, kind: str) -> None:
    r = client.post("/predict/batch", json=payload)
    assert r.status_code == 422
    assert error_of(r) == kind


def test_body_over_byte_limit_is_refused_before_parsing() -> None:
    with make_client(max_body_bytes=2048, max_batch=1, max_text_chars=300) as c:  # 2048 holds a batch of that
        r = c.post(
            "/predict", content=b'{"text": "' + b"a" * 4000 + b'"}', headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        assert error_of(r) == "body_too_large"

        def chunks():
            yield b'{"text": "'
            for _ in range(10):
                yield b"a" * 500
            yield b'"}'

        r = c.post("/predict", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert error_of(r) == "body_too_large"


@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
@pytest.mark.parametrize("coding", ["gzip", "br", "GZIP "])
def test_a_compressed_body_is_refused_with_415_and_what_is_accepted(client: TestClient, path: str, coding: str) -> None:
    import gzip

    body = gzip.compress(b'{"text": "flight", "texts": ["flight"]}')
    r = client.post(path, content=body, headers={"content-type": "application/json", "content-encoding": coding})
    assert r.status_code == 415
    assert error_of(r) == "unsupported_content_encoding"
    assert r.headers["accept-encoding"] == "identity"
    assert coding.strip().lower() in r.json()["error"]["message"]
    identity = client.post(
        path,
        json={"texts": ["flight"]} if "batch" in path else {"text": "flight"},
        headers={"content-encoding": "identity"},
    )
    assert identity.status_code == 200


@pytest.mark.parametrize(
    ("lines", "refused"),
    [
        (["gzip", "identity"], "gzip"),  # the last line alone had read as plain
        (["identity", "br"], "br"),
        (["identity, gzip"], "gzip"),
        (["identity", "identity"], None),
        ([""], None),
    ],
)
def test_every_content_encoding_line_counts(client: TestClient, lines: list[str], refused: str | None) -> None:
    headers = [("content-type", "application/json"), *(("content-encoding", line) for line in lines)]
    r = client.post("/predict", content=b'{"text": "flight"}', headers=headers)
    if refused is None:
        assert r.status_code == 200
    else:
        assert (r.status_code, error_of(r)) == (415, "unsupported_content_encoding")
        assert r.json()["error"]["message"] == f"Content-Encoding {refused} is not accepted: send the body uncompressed"


def test_unknown_route_and_method(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404
    assert error_of(r) == "not_found"
    r = client.get("/predict")
    assert r.status_code == 405
    assert error_of(r) == "method_not_allowed"


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    r = client.post("/predict", json={"text": "flight to rome"}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.post("/predict", json={"text": "flight to rome"}, headers={"x-request-id": "bad id\twith tab"})
    assert len(r.headers["x-request-id"]) == 32
    assert r.headers["x-request-id"] != "bad id\twith tab"


def test_server_timing_header() -> None:
    """The model path's durations on a prediction, and on every response the service's whole time for it,
    which encloses them: measured on the committed model, as the fakes report made-up durations."""
    with TestClient(create_app(Settings(warmup_queries=0))) as client:
        check_server_timing(client)


def check_server_timing(client: TestClient) -> None:
    r = client.post("/predict", json={"text": "flight to rome"})
    assert r.status_code == 200
    timing = server_timings(r.headers["server-timing"])
    assert list(timing) == ["tokenize", "inference", "service"]
    assert 0 < timing["tokenize"] + timing["inference"] <= timing["service"]
    batch = client.post("/predict/batch", json={"texts": ["flight to rome", "hi"]})
    assert list(server_timings(batch.headers["server-timing"])) == ["tokenize", "inference", "service"]
    for answer, status in (
        (client.post("/predict", content=b"{", headers={"content-type": "application/json"}), 400),
        (client.get("/health"), 200),
    ):
        assert answer.status_code == status
        assert list(server_timings(answer.headers["server-timing"])) == ["service"]
        assert len(answer.headers.get_list("server-timing")) == 1


def test_classifier_fault_is_a_json_500_without_details() -> None:
    with TestClient(
        create_app(Settings(warmup_queries=0), fake_factory(FakeClassifier(fail=True))), raise_server_exceptions=False
    ) as c:
        r = c.post("/predict", json={"text": "hello"})
        assert r.status_code == 500
        assert r.json() == {"error": {"type": "internal_error", "message": "internal error"}}
        assert "Traceback" not in r.text
        assert c.get("/health").status_code == 200


def test_readiness_lifecycle() -> None:
    """Not ready before start-up and while the model loads and warms up; ready after; not ready at shutdown."""
    clf = FakeClassifier()
    seen: dict[str, object] = {}
    inner = fake_factory(clf)

    def factory(settings: Settings):
        seen["ready_while_loading"] = app.state.ready
        return inner(settings)

    app = create_app(Settings(warmup_queries=3), factory)

    async def before_startup() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)  # no lifespan: the model was never loaded
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [
                await c.get("/ready"),
                await c.post("/predict", json={"text": "flight"}),
                await c.get("/health"),
                await c.head("/ready"),
            ]

    ready, predict, health, head = asyncio.run(before_startup())
    assert ready.status_code == 503
    assert error_of(ready) == "not_ready"
    # HEAD answers as GET does, without the body.
    assert (head.status_code, head.headers["retry-after"], head.content) == (503, "1", b"")
    assert head.headers["content-length"] == ready.headers["content-length"]
    assert predict.status_code == 503
    assert error_of(predict) == "not_ready"
    assert predict.headers["retry-after"] == "1"
    assert health.status_code == 200  # liveness does not depend on the model
    with TestClient(app) as c:
        assert seen["ready_while_loading"] is False
        assert clf.calls == 3  # warmed up before ready: each text answered once,
        assert clf.warmed == list(WARMUP_TEXTS[:3])  # and run through every stage once
        assert c.get("/ready").json() == {"status": "ready"}
        assert c.get("/health").json() == {"status": "ok"}
        for path, body in (("/ready", b'{"status":"ready"}'), ("/health", b'{"status":"ok"}')):
            head = c.head(path)
            assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", str(len(body)))
        for path in ("/model", "/metrics"):  # every GET route takes HEAD
            get, head = c.get(path), c.head(path)
            assert (head.status_code, head.content) == (200, b"")
            assert head.headers["content-type"] == get.headers["content-type"]
    assert app.state.ready is False
    assert clf.closed


def test_overload_is_refused_at_once_with_retry_after() -> None:
    """A queue of one and a slow classifier: extra requests get 429 without waiting for inference."""
    app = create_app(
        Settings(warmup_queries=0, max_queue=1, max_batch=1, inference_mode="thread"),
        fake_factory(FakeClassifier(delay_s=0.3)),
    )

    async def scenario() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return list(await asyncio.gather(*(c.post("/predict", json={"text": "flight"}) for _ in range(5))))

    responses = asyncio.run(scenario())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 429, 429, 429, 429]
    for r in responses:
        if r.status_code == 429:
            assert error_of(r) == "overloaded"
            assert r.headers["retry-after"] == "1"


def test_auth_when_api_key_is_set() -> None:
    with make_client(api_key="s3cret") as c:
        assert c.post("/predict", json={"text": "flight"}).status_code == 401
        r = c.post("/predict", json={"text": "flight"}, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert error_of(r) == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        ok = c.post("/predict", json={"text": "flight"}, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/model").status_code == 401


def test_cors_off_by_default_and_configurable() -> None:
    with make_client() as c:
        r = c.options("/predict", headers={"origin": "https://x.example", "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in r.headers
    with make_client(cors_origins=["https://x.example"]) as c:
        r = c.options("/predict", headers={"origin": "https://x.example", "access-control-request-method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://x.example"


@pytest.mark.parametrize(("origin", "status"), [("https://x.example", 200), ("https://other.example", 400)])
def test_a_preflight_carries_a_request_id_and_the_services_time(origin: str, status: int) -> None:
    """The CORS layer answers preflights outside the service middleware: they had carried neither header."""
    asked = {"origin": origin, "access-control-request-method": "POST"}
    with make_client(cors_origins=["https://x.example"]) as c:
        r = c.options("/predict", headers={**asked, "x-request-id": "abc-123"})
        assert r.status_code == status
        assert r.headers["x-request-id"] == "abc-123"
        assert re.fullmatch(r"service;dur=\d+\.\d{3}", r.headers["server-timing"])
        fresh = c.options("/predict", headers={**asked, "x-request-id": "a b"}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", fresh)


def test_metrics_parse_and_name_every_family(client: TestClient) -> None:
    client.post("/predict", json={"text": "flight to rome"})
    client.post("/predict/batch", json={"texts": ["balance", "flight"]})
    client.post("/predict", json={"text": ""})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name in (
        "intent_requests",
        "intent_rejected",
        "intent_predictions",
        "intent_truncated_texts",
        "intent_keep_warm_queries",
    ):
        assert families[name].type == "counter"
    for name in ("intent_request_duration_seconds", "intent_stage_duration_seconds", "intent_batch_size"):
        assert families[name].type == "histogram"
    for name in ("intent_in_flight_requests", "intent_model_info", "intent_ready"):
        assert families[name].type == "gauge"
    samples = [s for f in families.values() for s in f.samples]
    stages = {s.labels["stage"] for s in samples if s.name == "intent_stage_duration_seconds_count"}
    assert stages == {"tokenize", "queue", "inference"}
    buckets = {float(s.labels["le"]) for s in samples if s.name == "intent_stage_duration_seconds_bucket"}
    assert min(buckets) <= 5e-5
    predicted = {s.labels["intent"]: s.value for s in samples if s.name == "intent_predictions_total"}
    assert predicted == {"book_flight": 2.0, "balance": 1.0}
    by_status = {(s.labels["route"], s.labels["status"]): s.value for s in samples if s.name == "intent_requests_total"}
    assert by_status[("/predict", "200")] == 1.0
    assert by_status[("/predict", "422")] == 1.0
    sizes = [s for s in samples if s.name == "intent_batch_size_sum"]
    assert sizes[0].value == 3.0


def test_health_stays_responsive_while_inference_is_busy() -> None:
    """Inline inference yields to the loop between texts, so /health is answered while a 64-text batch is
    still being classified, within a few of its texts. Counted in texts, not seconds: a loaded machine slows both."""
    clf = FakeClassifier(delay_s=0.005)
    app = create_app(Settings(warmup_queries=0, max_queue=200), fake_factory(clf))

    async def scenario() -> tuple[int, int, list[int]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                batch = asyncio.create_task(c.post("/predict/batch", json={"texts": ["flight"] * 64}))
                while clf.calls == 0:  # until the batch is being classified
                    await asyncio.sleep(0.001)
                asked_at = clf.calls
                health = await c.get("/health")
                answered_at = clf.calls
                done = await batch
                return asked_at, answered_at, [health.status_code, done.status_code]

    asked_at, answered_at, codes = asyncio.run(scenario())
    assert codes == [200, 200]
    # Asked and answered while the batch still had texts left (a loop blocked for the whole batch would show 64),
    # with few of its texts in between (the old bound, 0.1 s, was 20 texts of 5 ms).
    assert answered_at < 64, (asked_at, answered_at)
    assert answered_at - asked_at <= 20, (asked_at, answered_at)


def _log_strings(value: object, depth: int = 0) -> list[str]:
    """Every string a log record's value can turn into: str and repr of it and of everything inside it."""
    out = [str(value), repr(value)]
    if depth < 4:
        if isinstance(value, dict):
            for k, v in value.items():
                out += _log_strings(k, depth + 1) + _log_strings(v, depth + 1)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for v in value:
                out += _log_strings(v, depth + 1)
    return out


def test_user_text_never_reaches_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    # A fresh random marker inside the user's text: it cannot turn up by chance in a thread id or a
    # timestamp, as the card number's digits could.
    marker = secrets.token_hex(8)
    secret = f"{marker} my card number is 4111 1111 1111 1111 {marker}"
    with caplog.at_level(logging.DEBUG), make_client() as c:
        assert c.post("/predict", json={"text": secret}).status_code == 200
        assert c.post("/predict", json={"text": secret + "x" * 1000}).status_code == 422
        assert c.post("/predict/batch", json={"texts": [secret]}).status_code == 200
    assert any(r.name == "app.access" for r in caplog.records)  # the DEBUG access line was written
    from app.http.logs import JsonFormatter

    plain, structured = logging.Formatter(), JsonFormatter()
    # The whole marker, or either half of it (a truncated text), in any form it could be logged in.
    needles = (marker, marker[:8], marker[8:])
    for record in caplog.records:
        seen = [record.getMessage(), structured.format(record), plain.format(record)]
        seen += _log_strings(record.args) + _log_strings(record.exc_text) + _log_strings(record.stack_info)
        if record.exc_info:
            seen.append(plain.formatException(record.exc_info))
        for name, value in record.__dict__.items():
            seen += [name, *_log_strings(value)]
        for text in seen:
            assert not any(n in text.lower() for n in needles), f"user text in log record {record.name}: {text[:200]}"


def test_access_log_line_is_structured() -> None:
    from app.http.logs import JsonFormatter

    record = logging.LogRecord("app.access", logging.DEBUG, __file__, 1, "request", None, None)
    record.request_id = "abc"
    record.status = 200
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "request"
    assert line["request_id"] == "abc"
    assert line["status"] == 200
    assert line["level"] == "debug"


def test_the_readme_error_table_lists_every_error_kind_with_its_status() -> None:
    """Each row is `| 413 / 431 | `a` / `b` | ... |` (statuses and kinds pair up in order) or `| 400 | `a` / `b` |
    ... |` (one status for every kind in the row)."""
    from app.http.errors import STATUS
    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Errors") :].split("\n\n")[2]
    documented: dict[str, int] = {}
    for row in table.splitlines()[2:]:
        statuses, kinds = ([part.strip("`") for part in cell.strip().split(" / ")] for cell in row.split("|")[1:3])
        if len(statuses) == 1:
            statuses *= len(kinds)
        documented.update({kind: int(status) for status, kind in zip(statuses, kinds, strict=True)})
    assert documented == {error.kind: status for error, status in STATUS.items()}


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_the_largest_batch_the_defaults_allow_is_not_refused_for_its_bytes(
    client: TestClient, ensure_ascii: bool
) -> None:
    """64 texts of 1,000 CJK characters, as Python's json.dumps (and requests) writes them by default, 6 bytes a
    character: 384 KB, which had been refused 413 at a 256 KiB limit."""
    body = json.dumps({"texts": ["\u4e2d\u6587" * 500] * 64, "top_k": 10}, ensure_ascii=ensure_ascii).encode()
    r = client.post("/predict/batch", content=body, headers={"content-type": "application/json"})
    assert (r.status_code, len(r.json()["predictions"])) == (200, 64)


def test_a_405_names_the_methods_the_route_allows(client: TestClient) -> None:
    r = client.get("/predict/batch")
    assert (r.status_code, error_of(r), r.headers["allow"]) == (405, "method_not_allowed", "POST")


@pytest.mark.parametrize("path", ["/predict/", "/predict/batch/", "/health/", "/model/"])
def test_a_trailing_slash_is_an_unknown_route_not_a_redirect_built_from_the_host_header(
    client: TestClient, path: str
) -> None:
    r = client.request(
        "POST" if path.startswith("/predict") else "GET",
        path,
        json={"text": "hi"},
        headers={"host": "evil.example"},
        follow_redirects=False,
    )
    assert (r.status_code, error_of(r), r.json()["error"]["message"]) == (404, "not_found", f"no route {path}")
    assert "location" not in r.headers


def test_a_long_unknown_path_is_not_sent_back_whole(client: TestClient) -> None:
    r = client.get("/" + "a" * 5000)
    assert (r.status_code, r.json()["error"]["message"]) == (404, "no route /" + "a" * 99 + "...")


@pytest.mark.parametrize(("route", "fields"), [("/predict", "text, top_k"), ("/predict/batch", "texts, top_k")])
def test_an_unknown_fields_name_is_not_sent_back(client: TestClient, route: str, fields: str) -> None:
    """The name is the client's, and may hold anything (a password, a user's words)."""
    known = {"text": "hi"} if route == "/predict" else {"texts": ["hi"]}
    r = client.post(route, json={**known, "my password is hunter2": 1})
    assert (r.status_code, r.json()) == (
        422,
        {"error": {"type": "validation_error", "message": f"unknown field: the fields are {fields}"}},
    )


def test_a_batch_limit_over_the_queue_stops_start_up() -> None:
    """Each text of a batch takes a place in the queue: a full batch could never be admitted (a 429 for ever)."""
    with pytest.raises(ValueError, match="INTENT_MAX_BATCH 100 is over INTENT_MAX_QUEUE 10: a batch that large"):
        Settings(max_batch=100, max_queue=10)
    assert Settings(max_batch=10, max_queue=10).max_batch == 10


def test_a_check_of_several_settings_is_one_line_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m app`'s line for a check that no one setting fails (it had been an IndexError's traceback)."""
    from app.__main__ import settings_or_error

    monkeypatch.setenv("INTENT_MAX_QUEUE", "10")
    assert settings_or_error() == (
        "invalid settings: INTENT_MAX_BATCH 64 is over INTENT_MAX_QUEUE 10: a batch that large could never be "
        "admitted; lower the one or raise the other"
    )


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        (
            "INTENT_MAX_QUEU",
            "5",
            "invalid settings: INTENT_MAX_QUEU is not a setting (did you mean INTENT_MAX_QUEUE?); unset it, or see "
            "the README's Configuration",
        ),
        ("INTENT_HOST", "", "invalid setting INTENT_HOST: String should have at least 1 character"),
        (
            "INTENT_MODEL_DIR",
            "",
            "invalid setting INTENT_MODEL_DIR: is empty: unset it for the default, or name a path",
        ),
        (
            "INTENT_MODEL_POINTER",
            " ",
            "invalid setting INTENT_MODEL_POINTER: is empty: unset it for the default, or name a path",
        ),
        (
            "INTENT_SHUTDOWN_DELAY_S",
            "inf",
            "invalid setting INTENT_SHUTDOWN_DELAY_S: Input should be less than or equal to 300",
        ),
        (
            "INTENT_KEEP_WARM_MS",
            "inf",
            "invalid setting INTENT_KEEP_WARM_MS: Input should be less than or equal to 60000",
        ),
    ],
    ids=["typo", "empty-host", "empty-model-dir", "empty-pointer", "endless-drain", "endless-keep-warm"],
)
def test_a_setting_that_cannot_be_meant_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, line: str
) -> None:
    """A typo had been ignored (its default served in silence), an empty host had opened every interface, and a
    SIGTERM with an endless drain delay never ended the service."""
    from app.__main__ import settings_or_error

    monkeypatch.setenv(variable, value)
    assert settings_or_error() == line


def test_kubernetes_service_links_are_not_taken_for_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Kubernetes sets for a Service named `intent` in the same namespace."""
    for name in ("INTENT_SERVICE_HOST", "INTENT_SERVICE_PORT", "INTENT_SERVICE_PORT_HTTP", "INTENT_PORT_8000_TCP_ADDR"):
        monkeypatch.setenv(name, "10.0.0.7")
    monkeypatch.setenv("INTENT_PORT", "8123")
    assert Settings().port == 8123


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b'INTENT_PORT="8745\n', "invalid settings file: .env, line 1: not a NAME=value line (an unclosed quote?)"),
        (b"# ours\nINTENT_MAX_QUEUE=32\nINTENT_PORT=80\xff\n", "invalid settings file: .env is not UTF-8 text"),
    ],
    ids=["unclosed-quote", "not-utf8"],
)
def test_a_settings_file_that_cannot_be_read_whole_stops_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, line: str
) -> None:
    """python-dotenv skipped a line it could not parse (its setting fell back to the default: port 8000), and
    raised a traceback on bytes that are not UTF-8."""
    from app.__main__ import settings_or_error

    (tmp_path / ".env").write_bytes(content)
    monkeypatch.chdir(tmp_path)
    assert settings_or_error() == line


def test_a_settings_file_read_whole_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.__main__ import settings_or_error

    (tmp_path / ".env").write_text('# ours\n\nINTENT_PORT=8745\nINTENT_LOG_LEVEL="debug"\n')
    monkeypatch.chdir(tmp_path)
    for name in ("INTENT_PORT", "INTENT_LOG_LEVEL"):  # the environment comes before the file (`make test` sets PORT)
        monkeypatch.delenv(name, raising=False)
    settings = settings_or_error()
    assert isinstance(settings, Settings)
    assert (settings.port, settings.log_level) == (8745, "debug")
