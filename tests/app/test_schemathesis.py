"""Property-based run of schemathesis against the app's own OpenAPI (RELIABILITY.md row
"HTTP | schemathesis"): generated requests, valid and invalid, never get a 5xx, and every
documented response matches its schema."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance


def test_no_server_errors(live_server: str) -> None:
    # schemathesis' own pytest plugin does not run on this pytest; drive its strategies directly
    schema = schemathesis.openapi.from_url(f"{live_server}/openapi.json")
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            case.call_and_validate(checks=checks)

        run()
