"""Schemathesis against the app's own OpenAPI schema, on a real uvicorn server with the real model:
no 5xx, and every response matches the documented status codes, content types and schemas."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.servers import running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES_PER_OPERATION = 100


def fuzz(op, mode: GenerationMode, cases: dict[str, int]) -> None:
    key = f"{op.label} ({mode.value})"

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def check(case) -> None:
        cases[key] = cases.get(key, 0) + 1
        case.call_and_validate(checks=CHECKS)

    check()


def test_api_conforms_to_its_schema() -> None:
    cases: dict[str, int] = {}
    with running_server(env={"INTENT_MAX_QUEUE": "1024"}) as (base, _):
        schema = schemathesis.openapi.from_url(base + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {"POST /predict", "POST /predict/batch", "GET /ready"}
        # Negative (schema-violating) cases only exist for operations that take a body.
        posts = [op for op in operations if op.label.startswith("POST")]
        plan = [(op, GenerationMode.POSITIVE) for op in operations] + [(op, GenerationMode.NEGATIVE) for op in posts]
        for op, mode in plan:
            fuzz(op, mode, cases)
    print(f"\nschemathesis: {sum(cases.values())} cases, 0 server errors; per operation {cases}")
    assert sum(cases.values()) >= 200
