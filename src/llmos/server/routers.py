"""The daemon's routers, one module each; `create_app` includes them all.

Owns only the list. Each module named here defines `router` (a FastAPI APIRouter) and may define
`setup(state: ServerState)`, called once when the app is created (e.g. to hook the model manager)."""

from __future__ import annotations

import importlib

MODULES = ("openai_api", "ollama_api", "native_api", "sessions", "jobs", "metrics", "desktop")


def all_modules() -> list:
    modules = []
    for name in MODULES:
        try:
            module = importlib.import_module(f"llmos.server.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"llmos.server.{name}":
                raise
            continue  # not built yet
        modules.append(module)
    return modules
