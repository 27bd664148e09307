"""`llmos serve`: run the daemon (the kernel behind HTTP) with uvicorn.

Owns the command-line surface of `llmos.server.app.create_app` and the one-daemon-per-LLMOS_HOME lock
(`LLMOS_HOME/serve.lock`). Never contains server logic.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import signal
import socket
from pathlib import Path
from typing import IO, Annotated, Optional

import typer

from llmos.errors import InvalidRequestError

LOCK_FILE = "serve.lock"


def lock_home(host: str, port: int) -> IO:
    """Take LLMOS_HOME/serve.lock (an exclusive `fcntl.flock`) and write this daemon's pid, host and port into it
    (JSON). Keep the returned file open for the daemon's life: the OS releases the lock when the process ends,
    however it ends, so a crashed daemon never blocks the next one. Two daemons on one LLMOS_HOME would share
    its database, sessions and hibernated processes without knowing of each other.

    Raises `InvalidRequestError` naming the daemon that holds the lock (or LLMOS_HOME when it cannot be written)."""
    from llmos.fs.registry import llmos_home

    home = llmos_home()
    path = home / LOCK_FILE
    try:
        home.mkdir(parents=True, exist_ok=True)
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+")
    except OSError as e:
        raise InvalidRequestError(f"cannot create {path} ({e.strerror}); fix the permissions of LLMOS_HOME or set "
                                  "LLMOS_HOME to a writable folder.") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(f.read())
            pid, port_held = int(holder["pid"]), int(holder["port"])
            held_host = str(holder.get("host") or "127.0.0.1")
            held_host = f"[{held_host}]" if ":" in held_host else held_host
            who, url = f" (pid {pid}, port {port_held})", f"http://{held_host}:{port_held}/"
            stop = f" (kill {pid})"
        except (ValueError, KeyError, TypeError, OSError):  # it is still writing the file
            who, url, stop = "", "it", ""
        f.close()
        raise InvalidRequestError(f"another llmos daemon{who} already serves LLMOS_HOME {home}; use {url}, or "
                                  f"stop it first{stop}, or set LLMOS_HOME to another folder for a second "
                                  "daemon.") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": host, "port": port}) + "\n")
    f.flush()
    return f


def serve_command(
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback needs users with "
                                                     "API keys (`llmos user add`).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", help="A model to load at start-up: a name from `llmos models` or a checkpoint directory "
                              "(served under its directory name); repeatable. Others load on first use.")] = None,
    kv_memory: Annotated[str, typer.Option("--kv-memory", help="Each model's KV pool: bytes, a size such as 2GiB, "
                                                                "or a fraction of free memory.")] = "0.25",
    swap_memory: Annotated[str, typer.Option("--swap-memory", help="Each model's host swap for preempted and "
                                                                    "suspended processes; 0 = none.")] = "256MiB",
    policy: Annotated[str, typer.Option("--policy", help="Scheduling policy: fcfs, priority or fair.")] = "fair",
    models_memory: Annotated[Optional[str], typer.Option(
        "--models-memory", help="Bytes of models resident at once (weights + KV + swap), e.g. 8GiB; idle models "
                                "are unloaded to make room. Default: no limit.")] = None,
    keep_alive: Annotated[float, typer.Option(
        "--keep-alive", help="Seconds an idle model stays loaded (requests may override); < 0 = forever.")] = 300.0,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body, in bytes.")] = 4 * 2**20,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the llmos daemon: OpenAI- and Ollama-compatible APIs, the native process API, sessions, /metrics
    and the web desktop at http://HOST:PORT/. Ctrl-C or SIGTERM shuts it down gracefully."""
    import uvicorn

    from llmos.fs.users import UserStore
    from llmos.kernel.kernel import KernelConfig
    from llmos.kernel.kvcache import parse_memory_budget
    from llmos.server.app import ServerSettings, create_app, is_loopback

    if not 0 < port < 65536:
        raise InvalidRequestError(f"--port {port} is not a TCP port; use 1-65535.")
    if log_level not in ("debug", "info", "warning", "error"):
        raise InvalidRequestError(f"--log-level {log_level!r}: use debug, info, warning or error.")
    if not is_loopback(host) and not UserStore().has_users():
        raise InvalidRequestError(f"refusing to listen on {host} without API keys: anyone who can reach it could "
                                  "use it. Add a user first (`llmos user add NAME --role admin`), or bind to "
                                  "127.0.0.1.")
    if max_body < 1024:
        raise InvalidRequestError("--max-body must be at least 1024 bytes.")
    dirs, names = [], []
    for m in model or []:
        path = Path(m).expanduser()
        if path.is_dir():
            dirs.append(path)
            names.append(path.resolve().name)
        else:
            names.append(m)
    kernel = KernelConfig(kv_memory=kv_memory, swap_memory=swap_memory, policy=policy)
    if policy not in ("fcfs", "priority", "fair"):
        raise InvalidRequestError(f"--policy {policy!r}: use fcfs, priority or fair.")
    if not math.isfinite(keep_alive):
        raise InvalidRequestError(f"--keep-alive {keep_alive!r}: give a number of seconds (< 0 = forever).")
    # Fail now with one line, not at every request: the memory settings, the models to preload, the port.
    from llmos.kernel.kernel import _is_zero_size

    if parse_memory_budget(kv_memory) < 4096:
        raise InvalidRequestError(f"--kv-memory {kv_memory!r} is too small to hold a KV block; give e.g. 1GiB or 0.25.")
    if not _is_zero_size(swap_memory):
        parse_memory_budget(swap_memory, "cpu")
    lock = lock_home(host, port)  # held until this process ends
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        except OSError as e:
            raise InvalidRequestError(f"cannot listen on {host}:{port} ({e.strerror}); is another daemon running "
                                      "there? Choose another --port.") from None
    settings = ServerSettings(host=host, port=port, models=dirs, preload=[], kernel=kernel,
                              models_memory=parse_memory_budget(models_memory) if models_memory else None,
                              keep_alive_s=None if keep_alive < 0 else keep_alive, max_body_bytes=max_body)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    models = app.state.llmos.models
    try:  # load the --model models now: a bad one is one `error:` line, not a traceback from inside uvicorn
        for name in names:
            typer.echo(f"loading {name} ...", err=True)
            models.get(name)
    except BaseException:
        models.shutdown()
        raise
    typer.echo(f"llmos serving on http://{host}:{port}/ (API docs at /docs)", err=True)
    # uvicorn handles SIGINT/SIGTERM (a graceful shutdown), then re-raises the signal under the handler that was
    # installed before it ran; with these no-op handlers a graceful shutdown exits 0, as a daemon should.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    lock.close()
