"""Property-based requests generated from the OpenAPI schema (schemathesis), in-process against the app.

A bounded, deterministic run per operation and generation mode (``derandomize``: the same examples on
every run), reporting every failing operation at once:
- no request, valid or not, gets a 5xx, and every response matches what the schema documents for it;
- the schema says what the server enforces: data valid by the schema is not refused, data invalid by it
  is refused, and no undocumented status code appears.

A schema can bound a file part (non-empty, a size) but cannot describe a decodable image or sound, so for
the "valid data is accepted" check every generated file part is replaced by a real small PNG or WAV (the
other fields keep their generated values: the check still proves the schema says what the server enforces
for each of them). Garbage file content stays in the other checks: it must be refused with a 4xx, not a 5xx.
Likewise JSON Schema cannot compare two fields, so valid data leaves out a ``since`` after its ``until``
(refused with a 422 that says nothing can match).

Operations are driven through hypothesis directly (``APIOperation.as_strategy``) rather than the
schemathesis pytest plugin, whose lazy fixture loader does not run on pytest 9.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from conftest import image_bytes, wav_bytes
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
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
from service.schemas import parse_time
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
    root = tmp_path_factory.mktemp("schemathesis")
    # gguf_path names no file: the gguf backend answers its designed 503 at once; with the `llm` extra
    # installed its packaged model would otherwise write up to max_tokens (<= 4096) per generated example
    settings_ = Settings(
        collection=root / "c", allowed_roots=[media_root], max_upload_mb=1, gguf_path=root / "none.gguf"
    )
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_, embedder=embedder))


def no_server_error(ctx, response, case) -> bool | None:
    """``not_a_server_error``, except the designed 503 of an answer backend that is not installed."""
    if response.status_code == 503 and b'"generator_unavailable"' in response.content:
        return True
    return not_a_server_error(ctx, response, case)


MULTIPART = "multipart/form-data"


def _file_fields(operation) -> list[str]:
    """Names of the multipart body's file parts (``format: binary`` or an octet-stream content type)."""
    body = operation.get_body_for_media_type(MULTIPART)
    properties = body.form_properties if body is not None else {}
    return [
        name
        for name, prop in properties.items()
        if isinstance(prop, dict)
        and (prop.get("format") == "binary" or prop.get("contentMediaType") == "application/octet-stream")
    ]


def _with_real_media(case, fields: list[str], media: tuple[bytes, str]) -> Any:
    """``case`` with each generated file part in ``fields`` replaced by ``media`` (a decodable file and its
    content type; the part is named after the field, with no suffix, so the type names the decoder)."""
    data, content_type = media
    if case.media_type == MULTIPART and isinstance(case.body, dict):
        for name in fields:
            if name in case.body:  # an optional file part the example left out stays out
                case.body[name] = data
                case.multipart_content_types = {**(case.multipart_content_types or {}), name: content_type}
    return case


def _strategy(operation, mode: GenerationMode, valid_beyond_schema: bool):
    """The operation's cases; ``valid_beyond_schema``: also valid where a schema cannot say (real media in
    every file part, ``since`` not after ``until``; see the module docstring)."""
    cases = operation.as_strategy(generation_mode=mode)
    if not valid_beyond_schema:
        return cases
    cases = cases.filter(_span_ordered)
    fields = _file_fields(operation)
    if not fields:
        return cases
    # an image and a sound: the upload routes take either
    media = st.sampled_from([(image_bytes(), "image/png"), (wav_bytes(seconds=0.25), "audio/wav")])
    return st.tuples(cases, media).map(lambda pair: _with_real_media(pair[0], fields, pair[1]))


def invalid_data_refused(ctx, response, case) -> bool | None:
    """``negative_data_rejection``, where a 413 is a refusal too: this app's 1 MB body limit (documented on
    every body) comes before a field's own bound (a text of 100 001 characters can be over 1 MB)."""
    if response.status_code == 413:
        return True
    return negative_data_rejection(ctx, response, case)


def _span_ordered(case) -> bool:
    """Whether ``since`` is not after ``until`` (in a JSON body's ``filters``; a form's own fields)."""
    body = case.body if isinstance(case.body, dict) else {}
    filters = body.get("filters") if isinstance(body.get("filters"), dict) else body
    try:
        since, until = parse_time(filters.get("since")), parse_time(filters.get("until"))
    except (TypeError, ValueError):  # not a time: the server refuses it, as the schema says
        return True
    return since is None or until is None or since <= until


def _failures(
    schema, mode: GenerationMode, checks: list[Callable], valid_beyond_schema: bool = False
) -> list[str]:
    """``"METHOD /path: first line of the failure"`` for every operation where a check failed."""
    found = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @BOUNDED
        @given(case=_strategy(operation, mode, valid_beyond_schema))
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
    [(GenerationMode.POSITIVE, positive_data_acceptance), (GenerationMode.NEGATIVE, invalid_data_refused)],
    ids=["valid data accepted", "invalid data refused"],
)
def test_the_schema_says_what_the_server_enforces(api_schema, mode, check):
    # valid data needs what a schema cannot describe (decodable files...); invalid data keeps generated files
    valid = mode is GenerationMode.POSITIVE
    failures = _failures(api_schema, mode, [check, status_code_conformance], valid_beyond_schema=valid)
    assert not failures, "\n".join(failures)
