"""Model residency for the daemon: which models are loaded, each as one kernel on its own engine thread,
within a memory budget, unloaded after a keep-alive when idle, or pinned.

Owns the name -> Engine table. Model names are the registry's (`llmos models`): "default" (the bundled
model), registered names, and the directories given to `llmos serve --model` (by their directory name).
Never reads requests.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from llmos.errors import InvalidRequestError, ModelLoadError, ProcessNotFoundError
from llmos.fs.registry import list_models, resolve_model
from llmos.kernel.kernel import Kernel, KernelConfig
from llmos.server.engine import Engine

log = logging.getLogger("llmos.server")

DEFAULT_KEEP_ALIVE_S = 300.0


@dataclass
class Resident:
    """A loaded model: its engine, bytes it holds (weights + KV pool + swap pool), when it was last used
    (monotonic seconds), its keep-alive (seconds; None = forever) and whether it is pinned."""

    name: str
    path: Path
    engine: Engine
    nbytes: int
    loaded_at: float
    keep_alive_s: float | None
    pinned: bool = False

    @property
    def kernel(self) -> Kernel:
        return self.engine.kernel

    def expires_in(self, now: float) -> float | None:
        if self.pinned or self.keep_alive_s is None:
            return None
        return max(0.0, self.engine.last_used + self.keep_alive_s - now)

    def busy(self) -> bool:
        return self.kernel.has_work() or any(not p.is_finished for p in self.kernel.processes.values())


@dataclass
class ModelManager:
    """Loads models on demand (`get`), keeps at most `memory_budget` bytes of them resident (evicting idle,
    unpinned ones, least recently used first), and unloads idle ones after their keep-alive.

    `kernel_config`: every kernel's settings. `extra`: name -> directory of models given on the command line.
    `on_load(resident)` / `on_unload(resident)`: hooks for the server (metrics, sessions)."""

    kernel_config: KernelConfig = field(default_factory=KernelConfig)
    memory_budget: int | None = None
    keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S
    extra: dict[str, Path] = field(default_factory=dict)
    on_load: list = field(default_factory=list)  # callables(resident) run after a model loads
    on_unload: list = field(default_factory=list)  # callables(resident) run after a model unloads

    def __post_init__(self) -> None:
        self.resident: dict[str, Resident] = {}
        self.lock = threading.RLock()
        self._pids = itertools.count(1)  # shared by every kernel: a pid names one process in the whole daemon
        self._loading: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="llmos-model-reaper", daemon=True)
        self._reaper.start()

    # ---- names -------------------------------------------------------------------------------------

    def available(self) -> dict[str, Path]:
        """Every model a request may name: "default", registered models and command-line directories."""
        names: dict[str, Path] = {}
        try:
            names["default"] = resolve_model("default")
        except ModelLoadError:
            pass
        for entry in list_models():
            names[entry.name] = entry.path
        names.update(self.extra)
        return names

    def path_of(self, name: str) -> Path:
        """The directory of model `name`. Raises `ModelLoadError` (a 404) when no model has that name."""
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("give a model name (GET /v1/models lists them).")
        avail = self.available()
        if name in avail:
            return avail[name]
        for loaded in self.resident.values():
            if loaded.path.name == name:
                return loaded.path
        raise ModelLoadError(f"model {name!r} not found; available: {', '.join(sorted(avail)) or 'none'} "
                             "(add one with `llmos models add DIR`).")

    # ---- residency -----------------------------------------------------------------------------------

    def get(self, name: str, keep_alive_s: float | None | bool = False) -> Resident:
        """The resident model `name`, loading it if needed. `keep_alive_s` (seconds, None = forever; False =
        leave it as it is) updates its keep-alive. Raises `ModelLoadError` (unknown or broken model) or
        `InvalidRequestError` (it does not fit the memory budget even after unloading idle models)."""
        with self.lock:
            r = self.resident.get(name)
            if r is None:
                path = self.path_of(name)
                r = self._load(name, path)
            if keep_alive_s is not False:
                r.keep_alive_s = keep_alive_s
            r.engine.last_used = time.monotonic()
            return r

    def _load(self, name: str, path: Path) -> Resident:
        t0 = time.monotonic()
        kernel = Kernel(path, replace(self.kernel_config))
        kernel._pids = self._pids
        weights = sum(p.numel() * p.element_size() for p in kernel.model.parameters())
        nbytes = weights + kernel.pool.nbytes + kernel.swap_pool.nbytes
        self._make_room(nbytes, name)
        engine = Engine(kernel, name).start()
        r = Resident(name, path, engine, nbytes, time.time(), self.keep_alive_s)
        self.resident[name] = r
        log.info("loaded model %s from %s (%.1f MiB) in %.1f s", name, path, nbytes / 2**20, time.monotonic() - t0)
        for hook in self.on_load:
            hook(r)
        return r

    def _make_room(self, nbytes: int, name: str) -> None:
        if self.memory_budget is None:
            return
        used = sum(r.nbytes for r in self.resident.values())
        idle = sorted((r for r in self.resident.values() if not r.pinned and not r.busy()),
                      key=lambda r: r.engine.last_used)
        while used + nbytes > self.memory_budget and idle:
            victim = idle.pop(0)
            used -= victim.nbytes
            self.unload(victim.name)
        if used + nbytes > self.memory_budget:
            raise InvalidRequestError(
                f"model {name!r} needs {nbytes / 2**20:.0f} MiB but only {(self.memory_budget - used) / 2**20:.0f} "
                "MiB of the model memory budget is free and the loaded models are busy or pinned; unload one "
                "(or unpin it) or start the daemon with a larger --models-memory.")

    def unload(self, name: str) -> bool:
        """Stop and drop model `name` (its live processes end with it). False when it was not loaded."""
        with self.lock:
            r = self.resident.pop(name, None)
        if r is None:
            return False
        r.engine.stop()
        for hook in self.on_unload:
            hook(r)
        del r
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("unloaded model %s", name)
        return True

    def pin(self, name: str, pinned: bool = True) -> Resident:
        """Keep model `name` loaded whatever its keep-alive (loading it if needed)."""
        r = self.get(name)
        r.pinned = pinned
        return r

    def loaded(self) -> list[dict]:
        """One row per resident model: name, path, bytes, pinned, seconds until it unloads (None: never),
        live processes."""
        now = time.monotonic()
        with self.lock:
            return [{"name": r.name, "path": str(r.path), "bytes": r.nbytes, "pinned": r.pinned,
                     "expires_in_s": r.expires_in(now), "loaded_at": r.loaded_at,
                     "processes": sum(not p.is_finished for p in r.kernel.processes.values())}
                    for r in self.resident.values()]

    def find(self, pid: int) -> Resident:
        """The resident model whose kernel has process `pid`. Raises `ProcessNotFoundError` (a 404)."""
        with self.lock:
            for r in self.resident.values():
                if pid in r.kernel.processes:
                    return r
        raise ProcessNotFoundError(f"no process with pid {pid}; GET /v1/processes lists yours.")

    def engines(self) -> list[Engine]:
        with self.lock:
            return [r.engine for r in self.resident.values()]

    def _reap_loop(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self.lock:
                expired = [r.name for r in self.resident.values()
                           if (left := r.expires_in(now)) is not None and left <= 0 and not r.busy()]
            for name in expired:
                self.unload(name)

    def shutdown(self) -> None:
        """Stop the reaper and every engine."""
        self._stop.set()
        for name in list(self.resident):
            self.unload(name)
