"""The hot path: the service middleware answers POST /predict in every configuration (CORS wraps
it), metrics label routes from the router, and each request is counted once, before its last byte."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.http import routes as app_routes
from app.http.main import create_app
from app.http.metrics import Metrics
from app.http.middleware import Message, ServiceMiddleware
from tests.fakes import FakeClassifier, fake_factory

ORIGIN = "https://chat.example"


def build(clf: FakeClassifier | None = None, **settings: object) -> FastAPI:
    s = Settings(warmup_queries=0, **settings)  # type: ignore[arg-type]
    return create_app(s, fake_factory(clf or FakeClassifier()))


def without_fastapi_predict(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    """Break the documenting FastAPI route: it looks `predict_one` up at call time, while the
    direct path bound it in create_app. If FastAPI answered POST /predict, it would be a 500."""

    async def broken(state: Any, body: bytes) -> tuple[bytes, str]:
        raise AssertionError("the FastAPI /predict route answered")

    monkeypatch.setattr(app_routes, "predict_one", broken)
    return app


def requests_total(client: TestClient, route: str, method: str, status: str) -> float:
    text = client.get("/metrics").text
    line = f'intent_requests_total{{method="{method}",route="{route}",status="{status}"}}'
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


@pytest.mark.parametrize("cors", [False, True])
def test_direct_path_answers_predict_with_and_without_cors(cors: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    clf = FakeClassifier()
    settings: dict[str, object] = {"cors_origins": [ORIGIN]} if cors else {}
    with TestClient(without_fastapi_predict(build(clf, **settings), monkeypatch)) as c:
        r = c.post("/predict", json={"text": "flight to rome"}, headers={"origin": ORIGIN})
        assert r.status_code == 200
        assert r.json()["intent"] == "book_flight"
        assert "x-request-id" in r.headers
        assert clf.calls == 1
        if cors:
            assert r.headers["access-control-allow-origin"] == ORIGIN
        else:
            assert "access-control-allow-origin" not in r.headers


def test_cors_headers_on_direct_errors_and_preflight(monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(without_fastapi_predict(build(cors_origins=[ORIGIN]), monkeypatch)) as c:
        r = c.post("/predict", json={"text": ""}, headers={"origin": ORIGIN})
        assert r.status_code == 422
        assert r.headers["access-control-allow-origin"] == ORIGIN
        pre = c.options(
            "/predict",
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "content-type" in pre.headers["access-control-allow-headers"]


def test_preflight_needs_no_api_key_but_post_does() -> None:
    with TestClient(build(cors_origins=[ORIGIN], api_key="s3cret")) as c:
        pre = c.options("/predict", headers={"origin": ORIGIN, "access-control-request-method": "POST"})
        assert pre.status_code == 200
        r = c.post("/predict", json={"text": "flight"}, headers={"origin": ORIGIN})
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == ORIGIN
        ok = c.post("/predict", json={"text": "flight"}, headers={"origin": ORIGIN, "authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_fastapi_predict_route_is_in_the_openapi_schema() -> None:
    schema = build().openapi()["paths"]["/predict"]["post"]
    assert schema["requestBody"]["content"]["application/json"]["schema"]["required"] == ["text"]
    assert set(schema["responses"]) >= {"200", "400", "413", "422", "429", "503"}


def test_every_router_path_gets_its_own_route_label() -> None:
    with TestClient(build()) as c:
        assert c.get("/model").status_code == 200
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200
        assert c.post("/predict/batch", json={"texts": ["balance"]}).status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/no/such/path").status_code == 404
        assert c.get("/wp-login.php").status_code == 404
        assert requests_total(c, "/model", "GET", "200") == 1
        assert requests_total(c, "/health", "GET", "200") == 1
        assert requests_total(c, "/ready", "GET", "200") == 1
        assert requests_total(c, "/predict/batch", "POST", "200") == 1
        assert requests_total(c, "/openapi.json", "GET", "200") == 1
        assert requests_total(c, "other", "GET", "404") == 2
        assert requests_total(c, "/no/such/path", "GET", "404") == 0
        text = c.get("/metrics").text
        assert 'route="/wp-login.php"' not in text


def test_route_labels_follow_the_router() -> None:
    app = build()

    @app.get("/late")
    async def late() -> dict[str, str]:
        return {"ok": "yes"}

    with TestClient(app) as c:
        # Added after create_app: not in the labels the middleware was built with.
        assert c.get("/late").status_code == 200
        assert requests_total(c, "other", "GET", "200") == 1


def test_each_request_is_counted_exactly_once() -> None:
    with TestClient(build(cors_origins=[ORIGIN])) as c:
        for _ in range(5):
            assert c.post("/predict", json={"text": "flight"}, headers={"origin": ORIGIN}).status_code == 200
        assert c.post("/predict", json={"text": ""}).status_code == 422
        for _ in range(3):
            assert c.get("/health").status_code == 200
        assert requests_total(c, "/predict", "POST", "200") == 5
        assert requests_total(c, "/predict", "POST", "422") == 1
        assert requests_total(c, "/health", "GET", "200") == 3
        # The /metrics reads are counted once each, too; a read does not see itself (its body is made first).
        assert requests_total(c, "/metrics", "GET", "200") == 3
        assert requests_total(c, "/metrics", "GET", "200") == 4


def _run(mw: ServiceMiddleware, path: str, method: str, messages: list[Message]) -> list[Message]:
    sent: list[Message] = []
    incoming = list(messages)

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {"type": "http", "path": path, "method": method, "headers": []}
    asyncio.run(mw(scope, receive, send))
    return sent


def _count(metrics: Metrics, route: str, method: str, status: str) -> float:
    return metrics.requests.labels(route, method, status)._value.get()


def test_request_is_counted_before_its_final_body_is_sent() -> None:
    metrics = Metrics()
    seen_at_final: list[float] = []

    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b", "more_body": True})
        await send({"type": "http.response.body", "body": b"c"})

    mw = ServiceMiddleware(streaming, metrics, 1000, None, [], route_labels=frozenset({"/s"}))

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            if not message.get("more_body", False):
                seen_at_final.append(_count(metrics, "/s", "GET", "200"))
            else:
                assert _count(metrics, "/s", "GET", "200") == 0

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope: dict[str, Any] = {"type": "http", "path": "/s", "method": "GET", "headers": []}
    asyncio.run(mw(scope, receive, send))
    assert seen_at_final == [1.0]
    assert _count(metrics, "/s", "GET", "200") == 1


def test_request_without_a_body_is_counted_once_by_the_fallback() -> None:
    metrics = Metrics()

    async def never(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the direct path answers /predict")

    async def handler(body: bytes) -> tuple[bytes, str]:
        raise AssertionError("the client disconnected before its body")

    mw = ServiceMiddleware(
        never, metrics, 1000, None, [], route_labels=frozenset({"/predict"}), direct_posts={"/predict": handler}
    )
    sent = _run(mw, "/predict", "POST", [{"type": "http.disconnect"}])
    assert sent == []
    assert _count(metrics, "/predict", "POST", "499") == 1  # the client left: not the service's failure
    assert sum(_count(metrics, "/predict", "POST", s) for s in ("200", "400", "422", "499", "500")) == 1


def _service_kwargs(app: FastAPI) -> dict[str, Any]:
    (mw,) = [m for m in app.user_middleware if m.cls is ServiceMiddleware]
    return mw.kwargs


def test_cors_is_the_outermost_middleware() -> None:
    from fastapi.middleware.cors import CORSMiddleware

    app = build(cors_origins=[ORIGIN])
    # user_middleware[0] is the outermost layer: CORS sees every response, the direct /predict included. (Starlette's,
    # with the service's JSON body on a refused preflight.)
    assert [m.cls for m in app.user_middleware][1:] == [ServiceMiddleware]
    assert issubclass(app.user_middleware[0].cls, CORSMiddleware)
    assert set(_service_kwargs(app)["direct_posts"]) == {"/predict"}
    assert [m.cls for m in build().user_middleware] == [ServiceMiddleware]
    assert set(_service_kwargs(build())["direct_posts"]) == {"/predict"}


def test_route_labels_are_exactly_the_router_paths() -> None:
    app = build()
    router_paths = {r.path for r in app_routes.router.routes}
    docs = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    assert _service_kwargs(app)["route_labels"] == router_paths | docs
    assert router_paths == {"/predict", "/predict/batch", "/health", "/ready", "/model", "/metrics"}


# One request per router path, with the status it must answer: every path must be listed here.
ROUTER_REQUESTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "/predict": ("POST", {"json": {"text": "flight"}}, 200),
    "/predict/batch": ("POST", {"json": {"texts": ["balance", "flight"]}}, 200),
    "/health": ("GET", {}, 200),
    "/ready": ("GET", {}, 200),
    "/model": ("GET", {}, 200),
    "/metrics": ("GET", {}, 200),
}


@pytest.mark.parametrize("cors", [False, True])
def test_each_router_path_is_counted_under_its_own_label(cors: bool) -> None:
    settings: dict[str, object] = {"cors_origins": [ORIGIN]} if cors else {}
    app = build(**settings)
    assert set(ROUTER_REQUESTS) == {r.path for r in app_routes.router.routes}
    with TestClient(app) as c:
        for path, (method, kwargs, status) in ROUTER_REQUESTS.items():
            assert c.request(method, path, headers={"origin": ORIGIN}, **kwargs).status_code == status
        text = c.get("/metrics").text
        for path, (method, _, status) in ROUTER_REQUESTS.items():
            row = f'intent_requests_total{{method="{method}",route="{path}",status="{status}"}} 1.0'
            assert row in text.splitlines(), path
        assert 'route="other"' not in text


def test_a_route_added_to_the_router_gets_its_own_label(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hand-written list to update: a route declared on a router (even under a prefix) is a label."""
    from fastapi import APIRouter

    extra = APIRouter()

    @extra.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    combined = APIRouter()
    combined.include_router(app_routes.router)
    combined.include_router(extra, prefix="/v2")
    monkeypatch.setattr("app.http.main.router", combined)
    app = build()
    assert "/v2/ping" in _service_kwargs(app)["route_labels"]
    with TestClient(app) as c:
        r = c.get("/v2/ping")
        assert r.status_code == 200
        assert r.json() == {"pong": "yes"}
        assert c.get("/v2/pong").status_code == 404
        assert requests_total(c, "/v2/ping", "GET", "200") == 1
        assert requests_total(c, "other", "GET", "404") == 1
        assert requests_total(c, "other", "GET", "200") == 0
        # The original routes are labelled as before; /predict is still the direct path.
        assert c.post("/predict", json={"text": "flight"}).status_code == 200
        assert requests_total(c, "/predict", "POST", "200") == 1
