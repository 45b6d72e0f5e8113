"""``LeanRoute``: a FastAPI route class that calls a ``request``-only endpoint directly.

For every request FastAPI's handler solves the endpoint's dependency graph, builds a spare ``Response``
for dependencies to set headers on and looks up the endpoint's source for error messages, even when the
endpoint takes nothing but the ``Request`` and answers a ``Response`` itself. On a sub-millisecond search
that is a measurable share. A :class:`LeanRoute` keeps everything around the handler (routing, the
``route`` scope key, exception handlers, OpenAPI) and hands such an endpoint the request directly.

It keeps FastAPI's own handler wherever that handler would do more: a dependency on the route, its
router or an ``include_router`` (an API key check), any parameter besides the request, a sync endpoint,
or a request traced by FastAPI's telemetry. A lean endpoint must answer a ``Response`` (else a 500).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import routing as fastapi_routing
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.telemetry import get_telemetry_data
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]

_PARAM_LISTS = ("path_params", "query_params", "header_params", "cookie_params", "body_params")
_SPECIAL = (
    "websocket_param_name",
    "http_connection_param_name",
    "response_param_name",
    "background_tasks_param_name",
    "security_scopes_param_name",
)


def _effective_dependant(route: APIRoute) -> Dependant | None:
    """The dependant FastAPI builds this handler for (with ``include_router`` dependencies), if known."""
    var = getattr(fastapi_routing, "_effective_route_context_var", None)
    if var is None:  # another FastAPI: its include-time dependencies cannot be seen, so stay off
        return None
    context = var.get()
    if context is not None and getattr(context, "original_route", None) is route:
        return getattr(context, "dependant", None)
    return route.dependant


def request_only(dependant: Dependant | None) -> bool:
    """True when ``dependant`` is an ``async`` endpoint whose one parameter is the request."""
    if dependant is None or dependant.call is None or dependant.request_param_name is None:
        return False
    if dependant.dependencies or any(getattr(dependant, name, None) for name in (*_PARAM_LISTS, *_SPECIAL)):
        return False
    return inspect.iscoroutinefunction(dependant.call)


class LeanRoute(APIRoute):
    def get_route_handler(self) -> Handler:
        full = super().get_route_handler()
        dependant = _effective_dependant(self)
        if not request_only(dependant):
            return full
        assert dependant is not None and dependant.call is not None and dependant.request_param_name
        call, name = dependant.call, dependant.request_param_name

        async def handler(request: Request) -> Response:
            if get_telemetry_data() is not None:
                return await full(request)
            response = await call(**{name: request})
            if not isinstance(response, Response):
                raise TypeError(f"{call.__name__} must answer a Response on a LeanRoute")
            return response

        return handler
