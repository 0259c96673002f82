"""The dashboard's web server: the page, its JSON API and `/metrics`, read-only, in a thread.

Starlette (FastAPI's core, a Flower dependency, without FastAPI's validation layer, which a
read-only API does not need) served by uvicorn on a socket bound before the thread starts, so a
busy port is an error at `start()`. Every request passes `guard`: GET and HEAD only (anything
else 405), the token where one is set, and on a loopback address without a token only loopback
Host names (a page elsewhere cannot read it through DNS rebinding).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fedserver.addresses import is_loopback
from fedserver.dashboard.model import RunModel
from fedserver.status import build_status

LOG = logging.getLogger("flowerbed.dashboard")
COOKIE = "flowerbed_dashboard"
READ_METHODS = ("GET", "HEAD")
STOP_TIMEOUT = 5.0  # seconds the server thread gets to end
STATIC = {  # path -> (file in the package's static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
Handler = Callable[[Request], Awaitable[Response]]


def build_app(model: RunModel, token: str | None, names: Mapping[int, str], metrics: Callable[[], bytes],
              loopback_only: bool) -> Starlette:  # fmt: skip
    """The ASGI app serving `model`; `metrics` renders `/metrics`."""
    files = {path: (resources.files("fedserver.dashboard").joinpath("static", name).read_bytes(), kind)
             for path, (name, kind) in STATIC.items()}  # fmt: skip

    async def static(request: Request) -> Response:
        body, kind = files[request.url.path]
        return Response(body, media_type=kind)

    async def api_status(request: Request) -> Response:
        return JSONResponse(build_status(model, names=names).document())

    async def api_rounds(request: Request) -> Response:
        return JSONResponse({"rounds": model.rounds(since=_int_param(request, "since", 0))})

    async def api_nodes(request: Request) -> Response:
        nodes = model.nodes(names)
        limit = _int_param(request, "limit", len(nodes))
        shown = sorted(nodes, key=lambda n: (-(n["last_seen"] or 0.0), n["node_id"]))[:limit]  # most recent first
        return JSONResponse({"total": len(nodes), "nodes": shown})

    async def metrics_endpoint(request: Request) -> Response:
        from fedserver.dashboard.metrics import CONTENT_TYPE

        return Response(metrics(), media_type=CONTENT_TYPE)

    routes = [Route(path, static) for path in STATIC]
    routes += [Route("/api/status", api_status), Route("/api/rounds", api_rounds), Route("/api/nodes", api_nodes),
               Route("/metrics", metrics_endpoint)]  # fmt: skip
    return Starlette(routes=routes, middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard(token, loopback_only))])




def _int_param(request: Request, name: str, default: int) -> int:
    try:
        return max(0, int(request.query_params.get(name, default)))
    except ValueError:
        return default


def guard(token: str | None, loopback_only: bool) -> Callable[[Request, Handler], Awaitable[Response]]:
    """The middleware every request passes: methods, Host, token; and the safety headers."""
    expected = token.encode() if token else None

    async def check(request: Request, call_next: Handler) -> Response:
        if request.method not in READ_METHODS:
            response: Response = PlainTextResponse("read-only: GET only", status_code=405, headers={"Allow": "GET, HEAD"})
        elif loopback_only and not _loopback_host(request.headers.get("host", "")):
            response = PlainTextResponse("unknown Host", status_code=421)
        elif expected is not None and not _authorized(request, expected):
            response = PlainTextResponse("a token is needed: Authorization: Bearer TOKEN, or ?token=TOKEN", 401)
        else:
            response = await call_next(request)
            if expected is not None and _matches(request.query_params.get("token"), expected):
                response.set_cookie(COOKIE, token or "", httponly=True, samesite="strict")
        response.headers.update(HEADERS)
        return response

    return check


def _authorized(request: Request, expected: bytes) -> bool:
    bearer = request.headers.get("authorization", "")
    offered = (bearer[7:] if bearer.lower().startswith("bearer ") else None, request.query_params.get("token"),
               request.cookies.get(COOKIE))  # fmt: skip
    return any(_matches(candidate, expected) for candidate in offered)


def _matches(candidate: str | None, expected: bytes) -> bool:
    return candidate is not None and hmac.compare_digest(candidate.encode(), expected)


def _loopback_host(host_header: str) -> bool:
    """Whether a Host header (`name`, `name:port`, `[v6]:port`) names this machine's loopback."""
    host = host_header if host_header.endswith("]") else host_header.rsplit(":", 1)[0]
    return is_loopback(host.strip("[]"))


class WebServer:
    """uvicorn serving `app` on an already bound socket, in a daemon thread."""

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        import uvicorn

        config = uvicorn.Config(app, log_config=None, access_log=False, log_level="warning", lifespan="off", ws="none")
        self.server = uvicorn.Server(config)
        self.sock = sock
        self.thread = threading.Thread(target=self._serve, name="dashboard", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(STOP_TIMEOUT)
        self.sock.close()

    def _serve(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); OSError where it cannot be (a busy port, a foreign address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock
