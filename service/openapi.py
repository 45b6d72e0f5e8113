"""The OpenAPI schema finished so that it says what the server enforces, beyond what FastAPI derives.

- Every operation that takes a body documents the answers any body can get before a route sees it:
  400 (a body that cannot be parsed, e.g. multipart without a boundary), 408 (a body that stops
  arriving, ``service.limits``), 413 (a body over ``MM_MAX_UPLOAD_MB``) and 422 (validation).
- A model whose fields are "exactly one of" (a pydantic validator, invisible to JSON Schema) gets a
  ``oneOf`` of "this field given and not null" branches: :data:`EXACTLY_ONE_OF`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
BODY_ERRORS = {
    "400": "the body cannot be parsed (malformed multipart or form data)",
    "408": "the body stopped arriving before its declared length",
    "413": "the body is larger than MM_MAX_UPLOAD_MB",
    "422": "the body, a parameter or a field is invalid",
}
# component schema -> fields of which exactly one must be given (and not null)
EXACTLY_ONE_OF = {
    "SearchQuery": ("query", "item_id", "vector"),
    "SearchRequest": ("query", "item_id", "vector"),
}


def exactly_one_of(fields: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in fields]


def finish(spec: dict[str, Any]) -> dict[str, Any]:
    """Add the body errors and the exactly-one-of rules to ``spec`` (in place; also returned)."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict) or "requestBody" not in operation:
                continue
            responses = operation.setdefault("responses", {})
            for status, description in BODY_ERRORS.items():
                answer = responses.setdefault(status, {"description": description})
                answer.setdefault("content", {"application/json": {"schema": ERROR_REF}})
    schemas = spec.get("components", {}).get("schemas", {})
    assert "ErrorResponse" in schemas, "routes document their errors, so FastAPI lists ErrorResponse"
    for name, fields in EXACTLY_ONE_OF.items():
        schema = schemas.get(name)
        if schema is not None and all(f in schema.get("properties", {}) for f in fields):
            schema["oneOf"] = exactly_one_of(fields)
    return spec


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the finished schema (built and finished once, then cached)."""
    build = app.openapi
    finished: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "spec" not in finished:
            finished["spec"] = finish(build())
        return finished["spec"]

    app.openapi = openapi  # type: ignore[method-assign]
