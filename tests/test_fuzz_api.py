"""Schemathesis against the app's own OpenAPI schema, on a real uvicorn server with the real model:
no 5xx, and every response matches the documented status codes, content types and schemas."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.servers import running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
)
CASES: dict[str, int] = {}


@pytest.fixture(scope="module")
def api_schema():
    with running_server(env={"INTENT_MAX_QUEUE": "1024"}) as (base, _):
        yield schemathesis.openapi.from_url(base + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case) -> None:
    CASES[case.operation.label] = CASES.get(case.operation.label, 0) + 1
    case.call_and_validate(checks=CHECKS)


def test_report_cases_fuzzed() -> None:
    print(f"\nschemathesis cases per operation: {CASES} (total {sum(CASES.values())})")
    assert sum(CASES.values()) >= 200
