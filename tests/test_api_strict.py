"""What the service refuses at its edges that it had let through: NaN and Infinity in a JSON body, a text that
Unicode normalisation takes over the limit, a body not sent as JSON, a refused CORS preflight in plain text, and
singleton headers given twice."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.http.main import create_app
from tests.fakes import FakeClassifier, fake_factory

JSON = {"content-type": "application/json"}
ORIGIN = "https://chat.example"
ADMIN_KEY = "s3cret-admin"


def make_client(**settings: object) -> TestClient:
    s = Settings(warmup_queries=0, **settings)  # type: ignore[arg-type]
    return TestClient(create_app(s, fake_factory(FakeClassifier())))


@pytest.fixture
def client():
    with make_client() as c:
        yield c


@pytest.fixture
def admin(tmp_path: Path):
    with make_client(admin_key=ADMIN_KEY, model_pointer=tmp_path / "ptr.json") as c:
        yield c


def error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message"}
    return response.status_code, body["error"]["type"], body["error"]["message"]


# --- NaN and Infinity are not JSON (RFC 8259 6) ---


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/predict", b'{"text": "hi", "top_k": NaN}'),
        ("/predict", b'{"text": "hi", "top_k": Infinity}'),
        ("/predict", b'{"text": "hi", "top_k": -Infinity}'),
        ("/predict", b'{"text": NaN}'),
        ("/predict", b'{"text": "hi", "other": NaN}'),
        ("/predict/batch", b'{"texts": ["flight"], "top_k": Infinity}'),
        ("/predict/batch", b'{"texts": ["flight", NaN]}'),
        # A repeated key overrides the constant, and the body had validated (200).
        ("/predict", b'{"text": "hi", "top_k": NaN, "top_k": 1}'),
        ("/predict", b'{"text": Infinity, "text": "hi"}'),
        ("/predict/batch", b'{"texts": ["flight"], "top_k": -Infinity, "top_k": 1}'),
    ],
)
def test_nan_and_infinity_are_invalid_json(client: TestClient, path: str, body: bytes) -> None:
    r = client.post(path, content=body, headers=JSON)
    assert error(r) == (400, "invalid_json", "request body is not valid JSON")


def test_nan_and_infinity_in_a_string_are_text(client: TestClient) -> None:
    for text in ("NaN", "Infinity", "-Infinity", "flight at NaN o'clock"):
        assert client.post("/predict", json={"text": text, "top_k": 1}).status_code == 200
        assert client.post("/predict/batch", json={"texts": [text]}).status_code == 200
    r = client.post("/predict", content=b'{"text": "NaN", "top_k": 0}', headers=JSON)
    assert error(r)[:2] == (422, "validation_error")
    r = client.post("/predict", content=b'{"text": "NaN", "top_k": 1, "top_k": 2}', headers=JSON)
    assert (r.status_code, len(r.json()["top_k"])) == (200, 2)


@pytest.mark.parametrize("body", [b'{"model_dir": NaN}', b'{"model_dir": NaN, "model_dir": "/nowhere"}'])
def test_nan_in_a_reload_body_is_invalid_json(admin: TestClient, body: bytes) -> None:
    r = admin.post("/admin/reload", content=body, headers={**JSON, "authorization": f"Bearer {ADMIN_KEY}"})
    assert error(r) == (400, "invalid_json", "request body is not valid JSON")


# --- the text limit holds after Unicode normalisation ---


@pytest.mark.parametrize(("char", "grows"), [("\ufb2c", 3), ("\u0958", 2)])
def test_a_text_that_nfc_takes_over_the_limit_is_too_long(char: str, grows: int) -> None:
    """U+FB2C is 3 code points after NFC, U+0958 2: 6 characters as sent, over 10 as the tokenizer gets them."""
    with make_client(max_text_chars=10) as c:
        r = c.post("/predict", json={"text": char * 6})
        after = 6 * grows
        assert error(r) == (
            422,
            "text_too_long",
            f"text is {after} characters after Unicode normalisation; the limit is 10",
        )
        r = c.post("/predict/batch", json={"texts": ["flight", char * 6]})
        assert error(r) == (
            422,
            "text_too_long",
            f"texts.1 is {after} characters after Unicode normalisation; the limit is 10",
        )
        within = char * (10 // grows)
        assert c.post("/predict", json={"text": within}).status_code == 200
        assert c.post("/predict/batch", json={"texts": [within]}).status_code == 200
        # Still checked before normalisation, which is then not run on an overlong text.
        r = c.post("/predict", json={"text": char * 11})
        assert error(r) == (422, "text_too_long", "text is 11 characters; the limit is 10")


# --- a body sent as anything but JSON ---

BODIES = {"/predict": b'{"text": "flight"}', "/predict/batch": b'{"texts": ["flight"]}'}


@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
@pytest.mark.parametrize(
    "media",
    [
        "text/plain",
        "application/x-www-form-urlencoded",  # what `curl -d` sends
        "multipart/form-data; boundary=x",
        "text/json",
        "application/jsonp",
        "application/json; charset=latin-1",
        "application/json; charset=utf-16",
    ],
)
def test_a_body_not_sent_as_json_is_refused_with_415(client: TestClient, path: str, media: str) -> None:
    r = client.post(path, content=BODIES[path], headers={"content-type": media})
    assert error(r) == (415, "unsupported_media_type", f"Content-Type {media} is not accepted: send application/json")
    assert r.headers["connection"] == "close"  # answered before the body was read


@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
@pytest.mark.parametrize(
    "media",
    [
        None,  # no Content-Type at all: read as JSON, as before
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        'application/json;charset="UTF-8"',
        "application/merge-patch+json",
    ],
)
def test_a_json_body_is_accepted_with_or_without_a_content_type(
    client: TestClient, path: str, media: str | None
) -> None:
    headers = {} if media is None else {"content-type": media}
    assert client.post(path, content=BODIES[path], headers=headers).status_code == 200


def test_two_content_types_are_refused(client: TestClient) -> None:
    headers = [("content-type", "text/plain"), ("content-type", "application/json")]  # the last one had won
    r = client.post("/predict", content=BODIES["/predict"], headers=headers)
    assert error(r)[:2] == (415, "unsupported_media_type")


def test_the_content_type_check_leaves_other_answers_alone(client: TestClient) -> None:
    text = {"content-type": "text/plain"}
    assert error(client.put("/predict", content=b"x", headers=text))[:2] == (405, "method_not_allowed")
    assert error(client.post("/health", content=b"x", headers=text))[:2] == (405, "method_not_allowed")
    assert error(client.post("/nope", content=b"x", headers=text))[:2] == (404, "not_found")
    with make_client(api_key="k") as c:  # the key is checked first, as for a Content-Encoding
        assert error(c.post("/predict", content=b"x", headers=text))[:2] == (401, "unauthorized")


def test_a_reload_body_not_sent_as_json_is_refused_with_415(admin: TestClient) -> None:
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    r = admin.post(
        "/admin/reload", content=b"{}", headers={**auth, "content-type": "application/x-www-form-urlencoded"}
    )
    assert error(r)[:2] == (415, "unsupported_media_type")
    assert r.headers["connection"] == "close"


# --- a refused CORS preflight ---


def test_a_refused_preflight_gets_the_json_error_body_and_the_cors_headers() -> None:
    with make_client(cors_origins=[ORIGIN]) as c:
        r = c.options("/predict", headers={"origin": "https://evil.example", "access-control-request-method": "POST"})
        assert error(r) == (400, "cors_refused", "CORS preflight refused: origin not allowed")
        assert r.headers["content-type"] == "application/json"
        assert "access-control-allow-origin" not in r.headers
        assert r.headers["access-control-allow-methods"] == "GET, POST"
        assert r.headers["vary"].startswith("Origin, Access-Control-Request-Method")

        r = c.options(
            "/predict",
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "DELETE",
                "access-control-request-headers": "x-no",
            },
        )
        assert error(r) == (400, "cors_refused", "CORS preflight refused: method, headers not allowed")
        assert r.headers["access-control-allow-origin"] == ORIGIN

        ok = c.options("/predict", headers={"origin": ORIGIN, "access-control-request-method": "POST"})
        assert (ok.status_code, ok.text, ok.headers["access-control-allow-origin"]) == (200, "OK", ORIGIN)
        simple = c.post("/predict", json={"text": "flight"}, headers={"origin": ORIGIN})
        assert (simple.status_code, simple.headers["access-control-allow-origin"]) == (200, ORIGIN)


# --- singleton headers given twice ---


@pytest.mark.parametrize(
    "lines",
    [("Bearer s3cret", "Bearer s3cret"), ("Bearer wrong", "Bearer s3cret"), ("Bearer s3cret", "Bearer wrong")],
)
def test_two_authorization_headers_are_refused_even_if_one_is_right(lines: tuple[str, str]) -> None:
    with make_client(api_key="s3cret") as c:
        r = c.post("/predict", json={"text": "flight"}, headers=[("authorization", line) for line in lines])
        assert error(r) == (401, "unauthorized", "more than one Authorization header")
        assert r.headers["www-authenticate"] == "Bearer"
        assert (
            c.post("/predict", json={"text": "flight"}, headers={"authorization": "Bearer s3cret"}).status_code == 200
        )


def test_two_authorization_headers_are_refused_on_the_admin_route(admin: TestClient) -> None:
    headers = [("authorization", f"Bearer {ADMIN_KEY}")] * 2
    r = admin.post("/admin/reload", json={}, headers=headers)
    assert error(r) == (401, "unauthorized", "more than one Authorization header")


def test_two_request_ids_give_way_to_a_fresh_one(client: TestClient) -> None:
    r = client.post("/predict", json={"text": "flight"}, headers=[("x-request-id", "abc"), ("x-request-id", "def")])
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert len(rid) == 32
    assert rid not in ("abc", "def")
    assert (
        client.post("/predict", json={"text": "flight"}, headers={"x-request-id": "abc"}).headers["x-request-id"]
        == "abc"
    )


# --- the auth scheme, 405's Allow, transfer codings ---


@pytest.mark.parametrize("value", ["bearer s3cret", "BEARER s3cret", "bEaReR s3cret", "Bearer  s3cret"])
def test_the_auth_scheme_is_read_in_any_case(value: str) -> None:
    """RFC 9110 11.1: the scheme is case-insensitive; `bearer k` had been 401."""
    with make_client(api_key="s3cret") as c:
        assert c.post("/predict", json={"text": "flight"}, headers={"authorization": value}).status_code == 200


@pytest.mark.parametrize("value", ["Basic s3cret", "Bearers3cret", "s3cret", "Bearer s3cre", "Bearer s3cret!"])
def test_another_scheme_or_key_is_still_refused(value: str) -> None:
    with make_client(api_key="s3cret") as c:
        r = c.post("/predict", json={"text": "flight"}, headers={"authorization": value})
        assert error(r) == (401, "unauthorized", "missing or wrong API key")


def test_the_admin_scheme_is_read_in_any_case(admin: TestClient) -> None:
    r = admin.post("/admin/reload", json={}, headers={"authorization": f"bearer {ADMIN_KEY}"})
    assert r.status_code == 200  # {}: the model directory served now, loaded again


@pytest.mark.parametrize("path", ["/health", "/ready", "/model", "/metrics"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_a_405_on_a_get_route_allows_get_and_head(client: TestClient, path: str, method: str) -> None:
    """RFC 9110 15.5.6: the Allow of a 405 lists the route's methods; it had said `HEAD` alone."""
    r = client.request(method, path)
    assert error(r)[:2] == (405, "method_not_allowed")
    assert sorted(r.headers["allow"].split(", ")) == ["GET", "HEAD"]
    assert client.get(path).status_code == client.head(path).status_code == 200


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate,chunked", "gzip", "identity, chunked"])
@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
def test_a_transfer_coding_other_than_chunked_is_refused_with_501(client: TestClient, path: str, coding: str) -> None:
    """RFC 9112 6.1: the body under `gzip, chunked` had been read as plain JSON (a 400 invalid_encoding)."""
    r = client.post(path, content=b"\x1f\x8b\x08\x00", headers={**JSON, "transfer-encoding": coding})
    assert error(r) == (
        501,
        "unsupported_transfer_coding",
        f"Transfer-Encoding {coding.removesuffix('chunked').strip(' ,').lower()} is not implemented: send chunked "
        "or a Content-Length",
    )
    assert r.headers["connection"] == "close"


def test_a_chunked_body_is_still_read(client: TestClient) -> None:
    r = client.post("/predict", content=iter([b'{"text": ', b'"flight"}']), headers=JSON)
    assert r.status_code == 200
