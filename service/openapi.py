"""The OpenAPI schema finished so that it says what the server enforces, beyond what FastAPI derives.

- Every operation that takes a body documents the answers any body can get before a route sees it:
  400 (a body that cannot be parsed, e.g. multipart without a boundary), 408 (a body that stops
  arriving, ``service.limits``), 413 (a body over ``MM_MAX_UPLOAD_MB``) and 422 (validation).
- A model whose fields are "exactly one of" (a pydantic validator, invisible to JSON Schema) gets a
  ``oneOf`` of "this field given and not null" branches: :data:`EXACTLY_ONE_OF`.
- A form field is sent or absent, never null (a form cannot send null: a client following the schema
  sent the text "null" as a file), and a file holds at least one byte.
- A query vector holds a non-zero number, and, once the app has loaded its model, exactly ``dim`` of them.
- A chat request holds a user message with text (the question): :data:`USER_TEXT`.
- A body with an exactly-one-of rule is required (an absent body gives none of the fields).
- A keyword search has a text query: :data:`KEYWORD_NEEDS_TEXT`.
"""

from __future__ import annotations

import copy
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
    "Body_add_item_items_post": ("file", "text"),  # POST /items: a file or a text
}
VECTOR_SCHEMAS = ("SearchQuery", "SearchRequest")
KEYWORD_NEEDS_TEXT = [  # SearchQuery's rule: mode 'keyword' searches words, so only a text query
    {"properties": {"mode": {"enum": ["hybrid", "vector"]}}},
    {"required": ["query"], "properties": {"query": {"type": "string"}}},
]
_TEXT = {"type": "string", "pattern": r"\S"}
USER_TEXT = {  # a chat message that can be the question: from the user, with some text
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"const": "user"},
        "content": {
            "anyOf": [
                _TEXT,
                {
                    "type": "array",
                    "contains": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"const": "text"}, "text": _TEXT},
                    },
                },
            ]
        },
    },
}
FLOAT32_MAX = 3.4028234663852886e38  # larger magnitudes are infinite as float32
FLOAT32_TINY = 1.401298464324817e-45  # the smallest float32 above zero (smaller ones read as 0)


def exactly_one_of(fields: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in fields]


def _is_file(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "string" and (
        "contentMediaType" in schema or schema.get("format") == "binary"
    )


def _form_bodies(spec: dict[str, Any]) -> set[str]:
    """Names of the component schemas that are multipart form bodies."""
    names = set()
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            body = operation.get("requestBody", {}) if isinstance(operation, dict) else {}
            ref = body.get("content", {}).get("multipart/form-data", {}).get("schema", {}).get("$ref", "")
            if ref.startswith("#/components/schemas/"):
                names.add(ref.rsplit("/", 1)[1])
    return names


def _form_fields(schema: dict[str, Any]) -> None:
    """A form field is sent or absent, never null; a file holds at least one byte."""
    for name, prop in schema.get("properties", {}).items():
        options = prop.get("anyOf")
        if options and {"type": "null"} in options:
            kept = [o for o in options if o != {"type": "null"}]
            rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
            prop = {**kept[0], **rest} if len(kept) == 1 else {"anyOf": kept, **rest}
            schema["properties"][name] = prop
        if _is_file(prop):
            prop.setdefault("minLength", 1)


def _vector(schema: dict[str, Any], dim: int | None) -> None:
    prop = schema.get("properties", {}).get("vector", {})
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "array":
            # float32, as the server reads it: finite, and not all zero (no direction)
            option["items"] = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
            option["contains"] = {"anyOf": [{"minimum": FLOAT32_TINY}, {"maximum": -FLOAT32_TINY}]}
            option["minItems"] = dim or 1
            if dim:
                option["maxItems"] = dim


def _body_refs(operation: dict[str, Any]) -> set[str]:
    """Component schema names of ``operation``'s request body, over its media types."""
    content = operation.get("requestBody", {}).get("content", {})
    refs = (media.get("schema", {}).get("$ref", "") for media in content.values())
    return {ref.rsplit("/", 1)[1] for ref in refs if ref.startswith("#/components/schemas/")}


def finish(spec: dict[str, Any], dim: int | None = None) -> dict[str, Any]:
    """Add the body errors and the exactly-one-of rules to ``spec`` (in place; also returned); ``dim``:
    the length of a query vector, when the model is loaded."""
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
    for name in _form_bodies(spec):
        _form_fields(schemas[name])
    for name, fields in EXACTLY_ONE_OF.items():
        schema = schemas.get(name)
        if schema is not None and all(f in schema.get("properties", {}) for f in fields):
            schema["oneOf"] = exactly_one_of(fields)
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict) and _body_refs(operation) & set(EXACTLY_ONE_OF):
                operation["requestBody"]["required"] = True
    for name in VECTOR_SCHEMAS:
        if name in schemas:
            _vector(schemas[name], dim)
            if "mode" in schemas[name].get("properties", {}):
                schemas[name]["anyOf"] = KEYWORD_NEEDS_TEXT
    messages = schemas.get("ChatRequest", {}).get("properties", {}).get("messages")
    if messages is not None:
        messages["contains"] = USER_TEXT  # the question: the last user message with text
    return spec


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the finished schema (built and finished once, then cached)."""
    build = app.openapi
    finished: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "spec" not in finished:
            embedder = getattr(app.state, "embedder", None)
            if embedder is None:  # before startup: finished again once the model (its dim) is known
                return finish(copy.deepcopy(build()))
            finished["spec"] = finish(build(), int(embedder.dim))
        return finished["spec"]

    app.openapi = openapi  # type: ignore[method-assign]
