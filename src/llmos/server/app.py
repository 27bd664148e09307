"""The daemon's HTTP application: settings, the shared state, authentication, quotas and the error format.

Owns `create_app(settings)`: a FastAPI app whose routers (OpenAI, Ollama, native process API, sessions,
metrics, the web desktop) share one `ServerState`. Every error leaves as JSON
`{"error": {"type": ..., "message": ..., "code": status}}` with the right status:
400 malformed JSON or bad parameters, 401 missing or wrong key, 403 someone else's process, 404 unknown
model or pid, 413 oversized body or prompt, 429 quota (with Retry-After), 500 only for a bug.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos.errors import (HibernationError, InvalidRequestError, LlmosError, ModelLoadError, OutOfBlocksError,
                          ProcessNotFoundError, QuotaExceededError)
from llmos.kernel.kernel import KernelConfig
from llmos.server.models import DEFAULT_KEEP_ALIVE_S, ModelManager, Resident

log = logging.getLogger("llmos.server")

LOCAL_USER = "local"


class ApiError(Exception):
    """An HTTP error with a JSON body: `status`, `type` (a short machine name) and `message` (what was wrong
    and what to do). `headers` go out with it (e.g. Retry-After)."""

    def __init__(self, status: int, type: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type, message, headers or {}


@dataclass
class ServerSettings:
    """`llmos serve`'s settings. `models`: directories to register by their directory name; `preload`: model
    names loaded at start-up; `kernel`: every kernel's KernelConfig; `models_memory`: bytes of models resident
    at once (None: no limit); `keep_alive_s`: idle seconds before a model unloads (None: never);
    `max_body_bytes`: request body limit; `require_keys`: refuse requests without a key even with no users."""

    host: str = "127.0.0.1"
    port: int = 8000
    models: list[Path] = field(default_factory=list)
    preload: list[str] = field(default_factory=list)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    models_memory: int | None = None
    keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S
    max_body_bytes: int = 4 * 2**20
    require_keys: bool = False


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner name of their processes and sessions, and their role."""

    name: str
    role: str = "user"
    max_processes: int | None = None
    tokens_per_minute: int | None = None
    max_kv_blocks: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class TokenRate:
    """Tokens per minute per user over a sliding 60-second window (prompt + generated tokens)."""

    def __init__(self) -> None:
        self._events: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def _window(self, user: str, now: float) -> deque[tuple[float, int]]:
        q = self._events.setdefault(user, deque())
        while q and q[0][0] <= now - 60:
            q.popleft()
        return q

    def used(self, user: str) -> int:
        with self._lock:
            return sum(n for _, n in self._window(user, time.monotonic()))

    def check(self, p: Principal) -> None:
        """Raise a 429 ApiError (with Retry-After) when `p` has used its tokens for this minute."""
        if p.tokens_per_minute is None:
            return
        now = time.monotonic()
        with self._lock:
            q = self._window(p.name, now)
            used = sum(n for _, n in q)
            if used < p.tokens_per_minute:
                return
            # Wait until enough of the oldest usage leaves the window.
            over, retry = used - p.tokens_per_minute, 1.0
            for t, n in q:
                over -= n
                retry = t + 60 - now
                if over < 0:
                    break
        raise ApiError(429, "quota_exceeded", f"user {p.name!r} has used {used} of {p.tokens_per_minute} tokens "
                       "this minute; retry after the time in Retry-After.",
                       {"Retry-After": str(max(1, math.ceil(retry)))})

    def charge(self, user: str, tokens: int) -> None:
        if tokens > 0:
            with self._lock:
                self._window(user, time.monotonic()).append((time.monotonic(), tokens))


class ServerState:
    """What every handler shares: settings, the model manager, the user store (None in single-user mode)
    and the token-rate accounting."""

    def __init__(self, settings: ServerSettings) -> None:
        from llmos.fs.users import UserStore

        self.settings = settings
        self.users = UserStore()
        self._single_user = not self.users.has_users()
        extra = {Path(m).expanduser().resolve().name: Path(m).expanduser().resolve() for m in settings.models}
        self.models = ModelManager(settings.kernel, settings.models_memory, settings.keep_alive_s, extra)
        self.rate = TokenRate()
        self.started = time.time()
        self.shutdown_hooks: list = []  # callables run at shutdown before the models unload (e.g. sessions)

    @property
    def single_user(self) -> bool:
        """No users are configured. Checked again on every request while true, so the first `llmos user add`
        takes effect at once in a running daemon (from then on keys are required; it never switches back)."""
        if self._single_user and self.users.has_users():
            self._single_user = False
            log.warning("users are configured now: API keys are required from here on")
        return self._single_user

    def engine_for(self, model: str, principal: Principal, keep_alive_s: float | None | bool = False) -> Resident:
        """The resident model `model`, with `principal`'s quotas applied to its kernel."""
        for what, limit in (("processes", principal.max_processes), ("KV blocks", principal.max_kv_blocks)):
            if limit == 0:
                raise ApiError(429, "quota_exceeded", f"user {principal.name!r} has a quota of 0 {what}; ask an "
                               "admin to raise it (`llmos user quota`).", {"Retry-After": "3600"})
        r = self.models.get(model, keep_alive_s)
        r.kernel.set_owner_limits(principal.name, principal.max_processes, principal.max_kv_blocks)
        return r


def is_loopback(host: str) -> bool:
    """Whether binding to `host` listens on this machine only ("" means every interface: not loopback)."""
    from llmos.fs.users import is_loopback as _loopback

    return bool(host) and _loopback(host)


# ---- authentication -------------------------------------------------------------------------------


def _key_from(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


async def principal(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer KEY` (or `x-api-key`). Single-user mode (no users configured):
    everyone is the local admin. Raises a 401 ApiError for a missing or wrong key."""
    state: ServerState = request.app.state.llmos
    if state.single_user and not state.settings.require_keys:
        return Principal(LOCAL_USER, "admin")
    key = _key_from(request)
    if not key:
        raise ApiError(401, "authentication_error", "missing API key: send `Authorization: Bearer <key>` "
                       "(an admin creates keys with `llmos user key NAME`).")
    user = await asyncio.to_thread(state.users.authenticate, key)
    if user is None:
        raise ApiError(401, "authentication_error", "invalid API key: check it, or ask an admin for a new one "
                       "(`llmos user key NAME`).")
    q = user.quota
    return Principal(user.name, user.role, getattr(q, "max_processes", None), getattr(q, "tokens_per_minute", None),
                     getattr(q, "max_kv_blocks", None))


async def admin(p: Principal = Depends(principal)) -> Principal:
    if not p.is_admin:
        raise ApiError(403, "permission_error", f"this needs an admin; user {p.name!r} is not one.")
    return p


def check_owner(p: Principal, owner: str, what: str) -> None:
    """403 unless `p` owns it or is an admin."""
    if owner != p.name and not p.is_admin:
        raise ApiError(403, "permission_error", f"{what} belongs to another user.")


# ---- errors ---------------------------------------------------------------------------------------


def error_response(status: int, type: str, message: str, headers: dict | None = None,
                   path: str = "") -> JSONResponse:
    """The JSON error: `{"error": {"type", "message", "code"}}`; under /api/ (Ollama's routes) the message
    string itself is `error`, which Ollama clients show as is."""
    if path.startswith("/api/"):
        return JSONResponse({"error": message, "type": type, "code": status}, status_code=status, headers=headers)
    return JSONResponse({"error": {"type": type, "message": message, "code": status}}, status_code=status,
                        headers=headers)


def llmos_error_status(err: LlmosError) -> tuple[int, str]:
    """The HTTP status and type for a kernel/model error."""
    message = str(err)
    if isinstance(err, QuotaExceededError):
        return 429, "quota_exceeded"
    if isinstance(err, ProcessNotFoundError):
        return 404, "not_found"
    if isinstance(err, ModelLoadError):
        return (404 if "not found" in message else 500), "model_error"
    if isinstance(err, HibernationError):
        return (404 if "no hibernated process" in message else 400), "hibernation_error"
    if isinstance(err, OutOfBlocksError) or (isinstance(err, InvalidRequestError) and "context window" in message):
        return 413, "request_too_large"
    return 400, "invalid_request_error"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc.status, exc.type, exc.message, exc.headers, request.url.path)

    @app.exception_handler(LlmosError)
    async def _llmos(request: Request, exc: LlmosError):
        status, type = llmos_error_status(exc)
        headers = {"Retry-After": "5"} if status == 429 else None
        return error_response(status, type, str(exc), headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
        return error_response(400, "invalid_request_error", "invalid request: " + "; ".join(parts),
                              path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, _TooLarge):
            limit = request.app.state.llmos.settings.max_body_bytes
            return error_response(413, "request_too_large", f"request body over {limit} bytes; send less.",
                                  path=request.url.path)
        type = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code,
                                                                                           "http_error")
        return error_response(exc.status_code, type, str(exc.detail), path=request.url.path)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; the daemon log has the details.",
                              path=request.url.path)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes (declared or streamed) gets a 413 JSON error."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._reject(send, scope["path"])
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send, scope["path"])

    async def _reject(self, send, path: str):
        response = error_response(413, "request_too_large", f"request body over {self.limit} bytes; send less.",
                                  path=path)
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


class _TooLarge(StarletteHTTPException):
    """Raised from inside `receive`: FastAPI's body reader lets HTTP exceptions through (any other becomes a 400)."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class SameOrigin:
    """ASGI middleware against cross-site requests and DNS rebinding (the daemon has no cookies, but single-user
    mode needs no key, so any web page could otherwise drive it):

    - a request with an `Origin` header (every browser request that may change state carries one) must come
      from the daemon's own origin: the scheme, host and port of its `Host` header; others get a 403;
    - when the daemon listens on loopback only, the `Host` header must name a loopback host (localhost,
      127.x, ::1): a page whose DNS name was rebound to 127.0.0.1 sends its own name and gets a 403.
    """

    def __init__(self, app, loopback_only: bool) -> None:
        self.app, self.loopback_only = app, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k: v for k, v in scope.get("headers", ())}
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin")
        if self.loopback_only and not is_loopback(_hostname(host)):
            return await _forbid(send, f"requests for host {host!r} are refused: this daemon serves only "
                                       "localhost (use http://127.0.0.1:PORT/).")
        if origin is not None:
            o = origin.decode("latin-1")
            if o.split("://", 1)[-1] != host:
                return await _forbid(send, f"cross-origin request from {o!r} refused; call the API from the "
                                           "desktop this daemon serves, or without an Origin header.")
        return await self.app(scope, receive, send)


def _hostname(host: str) -> str:
    """The host part of a Host header ("127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1")."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _forbid(send, message: str) -> None:
    response = error_response(403, "permission_error", message)
    await send({"type": "http.response.start", "status": 403, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class JsonBodies:
    """ASGI middleware: a POST to the APIs (/v1, /api) without a JSON content type (e.g. `curl -d '{...}'`, which
    says form-urlencoded, as Ollama's own examples do) is read as JSON; invalid JSON is then a 400 as usual."""

    FORM_TYPES = (b"", b"application/x-www-form-urlencoded", b"text/plain")

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH") \
                and scope["path"].startswith(("/v1/", "/api/")):
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
            ctype = dict(scope.get("headers", ())).get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype in self.FORM_TYPES:
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        return await self.app(scope, receive, send)


# ---- the app ----------------------------------------------------------------------------------------


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """The daemon's app. Routers are added from `llmos.server.ROUTERS` (those that exist)."""
    settings = settings or ServerSettings()
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for name in settings.preload:
            await asyncio.to_thread(state.models.get, name)
        if state.single_user:
            log.warning("no users configured: single-user mode, every request acts as %r (admin); "
                        "add users with `llmos user add NAME` to require API keys", LOCAL_USER)
        yield
        for hook in state.shutdown_hooks:
            try:
                await asyncio.to_thread(hook)
            except Exception:
                log.exception("shutdown hook failed")
        await asyncio.to_thread(state.models.shutdown)

    app = FastAPI(title="llmos", version=_version(), lifespan=lifespan,
                  description="An operating system for large language models: OpenAI- and Ollama-compatible "
                              "APIs, a native process API, sessions and metrics.")
    app.state.llmos = state
    install_error_handlers(app)

    @app.get("/health", tags=["system"])
    async def health() -> dict:
        """Liveness: the daemon answers, with its mode and loaded models."""
        return {"status": "ok", "single_user": state.single_user, "uptime_s": round(time.time() - state.started, 1),
                "models": [m["name"] for m in state.models.loaded()]}

    from llmos.server import routers

    for module in routers.all_modules():
        app.include_router(module.router)
        if hasattr(module, "setup"):
            module.setup(state)
    app.add_middleware(JsonBodies)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(SameOrigin, loopback_only=is_loopback(settings.host))
    return app


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("llmos")
    except Exception:
        return "0"
