"""Schema-driven fuzzing (schemathesis) of the real server from the app's own OpenAPI document:
whatever the generated request, the answer is never a 5xx and every error is OpenAI's envelope.
The budget is bounded (examples per operation) to keep CI short."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from bentowhisper.server.app import create_app

SCHEMA = schemathesis.openapi.from_dict(create_app().openapi())
ERROR_KEYS = {"message", "type", "param", "code"}


@SCHEMA.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_no_server_error(case, server) -> None:
    response = case.call(base_url=server.url, timeout=60)

    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        assert isinstance(body, dict) and set(body) == {"error"}, (
            case.as_curl_command(),
            response.status_code,
            response.text[:500],
        )
        assert set(body["error"]) == ERROR_KEYS, body
