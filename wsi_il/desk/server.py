"""The review desk's web application (Starlette) and its guard.

Security, for a medical-data server that several people log in to:

- the secret token comes once in the URL the command prints; the first request that carries it gets an
  HttpOnly, SameSite=Strict cookie and is redirected to the same page without the token; every other request
  without the cookie is answered 401;
- the Host header must name the address the server is bound to, ``localhost`` or ``127.0.0.1`` (a page of
  another site whose name was made to resolve to 127.0.0.1, "DNS rebinding", is answered 403);
- a request that changes anything (not GET or HEAD) must carry the token in the ``X-WSI-IL-Token`` header,
  which another site's page cannot read or set (CSRF): 403 without it;
- the page never names a file: batches, patches and slides are ids checked against the project, and an export is
  a name the exports folder lists.
"""

from __future__ import annotations

import hmac
import json
import re
import socket
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from wsi_il.desk.desk import Desk, NotFound
from wsi_il.errors import InputError, ProjectStateError, WsiIlError

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_HEADER = "x-wsi-il-token"
SAFE_METHODS = frozenset({"GET", "HEAD"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_BODY_BYTES = 1 << 20
_TILE = re.compile(r"^([0-9]{1,6})_([0-9]{1,6})\.jpeg$")

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


def cookie_name(port: int) -> str:
    """The cookie's name: one per port, as browsers share cookies between the ports of one host."""
    return f"wsi_il_desk_{port}"


class Guard:
    """ASGI middleware: Host check, token (URL once, then cookie), CSRF header on state-changing requests."""

    def __init__(self, app: ASGIApp, token: str, hosts: set[str], port: int) -> None:
        self.app = app
        self.token = token
        self.hosts = {h.lower() for h in hosts}
        self.port = port

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if _host_name(headers.get("host", "")) not in self.hosts:
            await _plain(403, "this address is not the review desk's; open the URL `wsi-il review` printed")(
                scope, receive, send
            )
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = (query.get("token") or [""])[0]
        if given and scope["method"] == "GET" and scope["path"] == "/":
            if not self._same(given):
                await _plain(401, "wrong token: open the URL `wsi-il review` printed")(scope, receive, send)
                return
            response = Response(
                status_code=303,
                headers={"location": "/", "cache-control": "no-store", "referrer-policy": "no-referrer"},
            )
            response.set_cookie(cookie_name(self.port), self.token, httponly=True, samesite="strict", path="/")
            await response(scope, receive, send)
            return
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except Exception:
            cookies = SimpleCookie()
        cookie = cookies.get(cookie_name(self.port))
        if cookie is None or not self._same(cookie.value):
            await _plain(401, "not signed in: open the URL with the token that `wsi-il review` printed")(
                scope, receive, send
            )
            return
        if scope["method"] not in SAFE_METHODS and not self._same(headers.get(TOKEN_HEADER, "")):
            await _plain(403, f"a change needs the {TOKEN_HEADER} header (the page sends it)")(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _same(self, value: str) -> bool:
        return hmac.compare_digest(value.encode("utf-8", "replace"), self.token.encode("utf-8"))


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _plain(status: int, text: str) -> Response:
    return PlainTextResponse(text, status_code=status, headers={"cache-control": "no-store"})


def _error(exc: WsiIlError) -> JSONResponse:
    status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, ProjectStateError) else 400
    return JSONResponse(
        {"error": exc.message, "hint": exc.hint, "text": str(exc)},
        status_code=status,
        headers={"cache-control": "no-store"},
    )


def _json(data: Any) -> JSONResponse:
    return JSONResponse(data, headers={"cache-control": "no-store"})


def _image(data: bytes, media_type: str, cache: bool = True) -> Response:
    return Response(
        data, media_type=media_type, headers={"cache-control": "private, max-age=3600" if cache else "no-store"}
    )


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise InputError("the request is too large", "send fewer answers at once")
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise InputError("the request is not JSON", "reload the page") from exc
    if not isinstance(data, dict):
        raise InputError("the request is not a JSON object", "reload the page")
    return data


def _answers(data: dict[str, Any]) -> list[tuple[str, str]]:
    items = data.get("answers")
    if not isinstance(items, list) or not items:
        raise InputError("the request holds no answers", "reload the page")
    answers = []
    for item in items:
        if not (
            isinstance(item, dict) and isinstance(item.get("patch_id"), str) and isinstance(item.get("label"), str)
        ):
            raise InputError("an answer needs a patch_id and a label", "reload the page")
        answers.append((item["patch_id"], item["label"]))
    return answers


def create_app(desk: Desk, token: str, hosts: set[str], port: int) -> ASGIApp:
    """The desk's application behind its guard; ``hosts`` are the Host names accepted (the bound one and the
    loopback names), ``port`` the port it listens on (it names the cookie)."""
    import anyio.to_thread

    def run(function: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return anyio.to_thread.run_sync(function, *args)

    def handler(work: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await work(request)
            except WsiIlError as exc:
                return _error(exc)
            except OSError as exc:  # disk full, permissions, a file removed underneath
                return _error(
                    WsiIlError(
                        f"{exc.strerror or exc} ({exc.filename or 'file'})",
                        "check free disk space and permissions, then try again",
                    )
                )

        return endpoint

    async def index(request: Request) -> Response:
        page = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{TOKEN}}", token)
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    async def project(request: Request) -> Response:
        return _json(await run(desk.overview))

    async def batch(request: Request) -> Response:
        return _json(await run(desk.batch, request.path_params["batch_id"]))

    async def answer(request: Request) -> Response:
        answers = _answers(await _body(request))
        labels = await run(desk.answer, request.path_params["batch_id"], answers)
        return _json({"labels": labels, "ahead": desk.ahead_state()})

    async def submit(request: Request) -> Response:
        return _json(await run(desk.submit, request.path_params["batch_id"]))

    async def labels(request: Request) -> Response:
        written = await run(desk.correct, _answers(await _body(request)))
        return _json({"written": written})

    async def patch(request: Request) -> Response:
        return _json(await run(desk.patch, request.path_params["patch_id"]))

    async def similar(request: Request) -> Response:
        count = _int(request.query_params.get("n", "12"), "n")
        return _json({"patches": await run(desk.similar, request.path_params["patch_id"], count)})

    async def context(request: Request) -> Response:
        tiles = _int(request.query_params.get("tiles", "3"), "tiles")
        return _image(await run(desk.context, request.path_params["patch_id"], tiles), "image/jpeg")

    async def thumbnail(request: Request) -> Response:
        return _image(await run(desk.thumbnail, request.path_params["slide_id"]), "image/jpeg")

    async def dzi(request: Request) -> Response:
        return _json(await run(desk.deep_zoom, request.path_params["slide_id"]))

    async def tile(request: Request) -> Response:
        found = _TILE.match(request.path_params["tile"])
        if not found:
            raise NotFound("no such tile", "reload the page")
        data = await run(
            desk.tile,
            request.path_params["slide_id"],
            request.path_params["level"],
            int(found.group(1)),
            int(found.group(2)),
        )
        return _image(data, "image/jpeg")

    async def overlay(request: Request) -> Response:
        data = await run(desk.overlay, request.path_params["slide_id"], request.path_params["kind"])
        return _image(data, "image/png", cache=False)

    async def patch_at(request: Request) -> Response:
        x = _float(request.query_params.get("x", ""), "x")
        y = _float(request.query_params.get("y", ""), "y")
        return _json({"patch_id": await run(desk.patch_at, request.path_params["slide_id"], x, y)})

    async def status(request: Request) -> Response:
        return _json(await run(desk.status))

    async def export(request: Request) -> Response:
        return _json({"files": await run(desk.export)})

    async def exported(request: Request) -> Response:
        path = await run(desk.export_file, request.path_params["name"])
        return FileResponse(path, headers={"cache-control": "no-store"})

    routes = [
        Route("/", index),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/api/project", handler(project)),
        Route("/api/batches/{batch_id}", handler(batch)),
        Route("/api/batches/{batch_id}/answers", handler(answer), methods=["POST"]),
        Route("/api/batches/{batch_id}/submit", handler(submit), methods=["POST"]),
        Route("/api/labels", handler(labels), methods=["POST"]),
        Route("/api/patches/{patch_id}", handler(patch)),
        Route("/api/patches/{patch_id}/similar", handler(similar)),
        Route("/api/patches/{patch_id}/context.jpeg", handler(context)),
        Route("/api/slides/{slide_id}/thumbnail.jpeg", handler(thumbnail)),
        Route("/api/slides/{slide_id}/dzi.json", handler(dzi)),
        Route("/api/slides/{slide_id}/tiles/{level:int}/{tile}", handler(tile)),
        Route("/api/slides/{slide_id}/overlays/{kind}.png", handler(overlay)),
        Route("/api/slides/{slide_id}/patch_at", handler(patch_at)),
        Route("/api/status", handler(status)),
        Route("/api/export", handler(export), methods=["POST"]),
        Route("/api/exports/{name}", handler(exported)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    return Guard(_headers(app), token, hosts, port)


def _headers(app: ASGIApp) -> ASGIApp:
    """Add the headers every answer carries: no framing, no referrer (the URL had the token), scripts only from
    the desk itself."""
    extra = [
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-content-type-options", b"nosniff"),
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    ]

    async def wrapped(scope: dict, receive: Callable, send: Callable) -> None:
        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await app(scope, receive, sending)

    return wrapped


def _int(text: str, name: str) -> int:
    if not re.fullmatch(r"[0-9]{1,4}", text):
        raise InputError(f"{name}={text[:20]!r} is not a small whole number", "reload the page")
    return int(text)


def _float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise InputError(f"{name}={text[:20]!r} is not a number", "reload the page") from exc


def bind(host: str, port: int) -> socket.socket:
    """Listen on ``host``:``port`` (0: a free port); a port in use says so in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InputError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", "pick another --port (0 takes a free one)"
        ) from exc
    return sock


def serve(app: ASGIApp, sock: socket.socket) -> None:
    """Serve until Ctrl-C or SIGTERM; requests under way finish first (at most a few seconds are waited)."""
    import signal

    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    # uvicorn raises the signal that stopped it again once it is done: let that one end nothing more.
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, previous in quiet.items():
            signal.signal(sig, previous)
        sock.close()
