"""Property-based requests generated from the OpenAPI schema (schemathesis), in-process against the app.

A bounded, deterministic run per operation and generation mode (``derandomize``: the same examples on
every run), reporting every failing operation at once:
- no request, valid or not, gets a 5xx, and every response matches what the schema documents for it;
- the schema says what the server enforces: data valid by the schema is not refused, data invalid by it
  is refused, and no undocumented status code appears.

Operations are driven through hypothesis directly (``APIOperation.as_strategy``) rather than the
schemathesis pytest plugin, whose lazy fixture loader does not run on pytest 9.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings

MAX_EXAMPLES = 15  # per operation and mode: CI's run stays bounded; raise it for a deeper search
BOUNDED = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # deterministic examples: a failure here is a failure on every run
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failing example is reported as found
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, embedder, media_root):
    settings_ = Settings(
        collection=tmp_path_factory.mktemp("schemathesis") / "c", allowed_roots=[media_root], max_upload_mb=1
    )
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_, embedder=embedder))


def no_server_error(ctx, response, case) -> bool | None:
    """``not_a_server_error``, except the designed 503 of an answer backend that is not installed."""
    if response.status_code == 503 and b'"generator_unavailable"' in response.content:
        return True
    return not_a_server_error(ctx, response, case)


def _failures(schema, mode: GenerationMode, checks: list[Callable]) -> list[str]:
    """``"METHOD /path: first line of the failure"`` for every operation where a check failed."""
    found = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @BOUNDED
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            case.call_and_validate(checks=checks)

        try:
            run()
        except Unsatisfiable:  # nothing of this mode to generate (e.g. no invalid input for GET /health)
            continue
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every failing operation is reported
            # schemathesis' FailureGroup is a BaseExceptionGroup; its text holds the status and a curl line
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            found.append(f"{operation.label}: {' | '.join(lines)[:700]}")
    return found


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_server_error_and_responses_match_the_schema(api_schema, mode):
    failures = _failures(
        api_schema, mode, [no_server_error, response_schema_conformance, content_type_conformance]
    )
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "mode, check",
    [(GenerationMode.POSITIVE, positive_data_acceptance), (GenerationMode.NEGATIVE, negative_data_rejection)],
    ids=["valid data accepted", "invalid data refused"],
)
def test_the_schema_says_what_the_server_enforces(api_schema, mode, check):
    failures = _failures(api_schema, mode, [check, status_code_conformance])
    assert not failures, "\n".join(failures)
