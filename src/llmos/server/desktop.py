"""The web desktop: the page at `/`, its static files under `/static/`, and the small endpoints it needs
that no other router has: who am I, which models are resident, load / unload / pin.

Owns only what the browser page needs; never runs generations or lists processes itself (the OpenAI and
native routers do), and never serves a file from outside its own `static/` directory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import FileResponse

from llmos.server.app import ApiError, Principal, ServerState, admin, principal

STATIC = Path(__file__).resolve().parent / "static"

# Explicit types: a browser refuses an ES module served as anything but JavaScript, and the platform's
# mimetypes table is not always right about .js.
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".ico": "image/x-icon", ".json": "application/json"}

# The page is small and changes with the daemon; revalidate every load so an upgrade shows at once.
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.llmos


# ---- the page -------------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The desktop page (static/index.html)."""
    return FileResponse(STATIC / "index.html", media_type=CONTENT_TYPES[".html"], headers=NO_CACHE)


@router.get("/static/{name:path}", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    """A file of the page from static/, with its content type. 404 for anything else (and for any path
    that would leave the directory)."""
    path = (STATIC / name).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file() or path.suffix not in CONTENT_TYPES:
        raise ApiError(404, "not_found", f"no static file {name!r}; the desktop is at /.")
    return FileResponse(path, media_type=CONTENT_TYPES[path.suffix], headers=NO_CACHE)


# ---- who is signed in -----------------------------------------------------------------------------


@router.get("/v1/whoami", tags=["desktop"])
async def whoami(request: Request, p: Principal = Depends(principal)) -> dict:
    """The caller's user name and role, and whether the daemon runs in single-user mode (no keys).
    401 for a missing or wrong key: the desktop signs in with this."""
    return {"name": p.name, "role": p.role, "single_user": _state(request).single_user}


# ---- model residency ------------------------------------------------------------------------------


# Not GET /v1/models/loaded: the OpenAI router's GET /v1/models/{model} comes first and would take it.
@router.get("/v1/residency", tags=["models"])
async def residency(request: Request, p: Principal = Depends(principal)) -> dict:
    """The resident models, one row each (name, bytes, pinned, expires_in_s — seconds until the keep-alive
    unloads it, null for never —, loaded_at, live processes; and for admins the directory, `path`), and the
    names of every model a request may load (`available`)."""
    state = _state(request)
    available = await asyncio.to_thread(state.models.available)
    loaded = state.models.loaded()
    if not p.is_admin:  # where the daemon keeps its models is the admin's business
        loaded = [{k: v for k, v in m.items() if k != "path"} for m in loaded]
    names = sorted(set(available) | {m["name"] for m in loaded})
    return {"data": loaded, "available": names}


def _row(state: ServerState, name: str) -> dict:
    for row in state.models.loaded():
        if row["name"] == name:
            return row
    raise ApiError(404, "not_found", f"model {name!r} is not loaded; POST /v1/models/{name}/load loads it.")


@router.post("/v1/models/{name}/load", tags=["models"])
async def load_model(name: str, request: Request, p: Principal = Depends(admin)) -> dict:
    """Load model `name` (a no-op when it is resident) and return its row. Admins only (in single-user mode
    the local user is one). 404 for an unknown model; 400 when it does not fit the memory budget."""
    state = _state(request)
    await asyncio.to_thread(state.models.get, name)
    return _row(state, name)


@router.post("/v1/models/{name}/unload", tags=["models"])
async def unload_model(name: str, request: Request, p: Principal = Depends(admin)) -> dict:
    """Unload model `name`; its live processes end with it. Admins only. 404 when it is not loaded."""
    state = _state(request)
    _row(state, name)
    unloaded = await asyncio.to_thread(state.models.unload, name)
    if not unloaded:  # unloaded by someone else (or the keep-alive) in the meantime
        raise ApiError(404, "not_found", f"model {name!r} is not loaded.")
    return {"name": name, "unloaded": True}


@router.post("/v1/models/{name}/pin", tags=["models"])
async def pin_model(name: str, request: Request, pinned: bool = Body(True, embed=True),
                    p: Principal = Depends(admin)) -> dict:
    """Pin model `name` (`{"pinned": true}`: stay loaded whatever its keep-alive, loading it if needed) or
    unpin it (`{"pinned": false}`). Admins only. Returns its row."""
    state = _state(request)
    await asyncio.to_thread(state.models.pin, name, pinned)
    return _row(state, name)
