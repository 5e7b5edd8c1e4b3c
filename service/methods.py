"""HTTP methods per path: the ``Allow`` header of a 405, and ``HEAD`` on every ``GET`` route.

FastAPI registers each method of a path as its own route, and a route knows only its own
methods: left alone, a 405 on ``/v1/jobs/{id}`` would allow ``GET`` but not ``DELETE``, and
``HEAD`` (which load balancers and uptime checks send) would be 405 wherever it is not declared.
"""

from __future__ import annotations

from starlette.routing import Match, Router
from starlette.types import ASGIApp, Receive, Scope, Send


_METHODS = ("DELETE", "GET", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(router: Router, scope: Scope) -> list[str]:
    """Every method some route of ``scope``'s path accepts (``HEAD`` wherever ``GET`` is), sorted.

    Asks each route whether it would take the request with each method, rather than reading
    routes' ``methods``: FastAPI nests included routers, whose own routes are not public."""
    allowed = {
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in router.routes)
    }
    if "GET" in allowed:
        allowed.add("HEAD")
    return sorted(allowed)


class HeadAsGetMiddleware:
    """Answers ``HEAD`` on a ``GET`` route as ``GET`` would (RFC 9110 §9.3.2).

    The app sees a ``GET``; uvicorn, which still sees the ``HEAD``, sends the headers (with the
    ``GET``'s ``Content-Length``) and drops the body. Other ``HEAD`` requests pass unchanged and
    get 405 with the path's real ``Allow`` header.
    """

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD" and "GET" in allowed_methods(self.router, scope):
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)
