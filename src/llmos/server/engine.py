"""One kernel driven by a background thread, and async followers of its processes.

Owns the step loop of a daemon's kernel and the hand-off of each process's new output to asyncio tasks.
Never parses requests or knows users (the API modules do); every kernel call still takes the kernel lock,
so request handlers may call the kernel's system calls directly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llmos.kernel.kernel import Kernel

log = logging.getLogger("llmos.server")


@dataclass
class Update:
    """What a process produced since the previous update: `text` (whole UTF-8 characters), `token_ids`,
    `logprobs` (one `(logprob, [(token, logprob)...])` per token when the request asked for them),
    and, once it has ended, `finished` with its `finish_reason`."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None


class Engine:
    """Runs `kernel.step()` on a background thread whenever the kernel has work, and wakes the asyncio
    tasks following a process after every step. `follow(pid)` is how handlers stream a process."""

    def __init__(self, kernel: Kernel, name: str) -> None:
        self.kernel, self.name = kernel, name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._subscribers: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._sub_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"llmos-engine-{name}", daemon=True)
        self.last_used = time.monotonic()
        self.steps_failed = 0
        self.step_hooks: list = []  # callables(kernel, tokens) run on the engine thread after every step

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the step loop (after the current step), end every live process (killed), and wake their
        followers so that every stream ends instead of waiting forever."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self.kernel.lock:
            for p in list(self.kernel.processes.values()):
                if not p.is_finished:
                    self.kernel.kill(p.pid)
        self._notify()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def wake(self) -> None:
        """Tell the loop there is new work (after spawn, resume, restore, fork)."""
        self.last_used = time.monotonic()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.kernel.has_work():
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            try:
                tokens = self.kernel.step()
            except Exception:  # a bug in one step must not take the daemon down: end the live processes
                self.steps_failed += 1
                log.exception("kernel step failed on %s; aborting its live processes", self.name)
                with self.kernel.lock:
                    for p in list(self.kernel.processes.values()):
                        if not p.is_finished:
                            self.kernel.kill(p.pid)
                tokens = 0
            for hook in self.step_hooks:
                try:
                    hook(self.kernel, tokens)
                except Exception:
                    log.exception("step hook failed")
            self.last_used = time.monotonic()
            self._notify()

    def _notify(self, pid: int | None = None) -> None:
        with self._sub_lock:
            targets = [s for p, subs in self._subscribers.items() if pid is None or p == pid for s in subs]
        for loop, event in targets:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: its follower is gone
                pass

    def notify(self, pid: int) -> None:
        """Wake the followers of `pid` (after a kill, suspend or hibernate from a handler)."""
        self._notify(pid)

    async def follow(self, pid: int, from_now: bool = False, new: bool = False) -> AsyncIterator[Update]:
        """Yield `Update`s for process `pid` as the engine produces them, until it ends (the last update has
        `finished` set); from its first output token, with `from_now` from what comes next, or with `new` from
        the first token this kernel generated (a restored process's earlier output is skipped). Any number
        of followers may follow one process. A suspended process yields nothing until it is resumed. Cancelling the iteration
        (a client disconnect) leaves the process alone: the caller decides whether to kill it."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._sub_lock:
            self._subscribers.setdefault(pid, []).append((loop, event))
        kernel = self.kernel
        with kernel.lock:  # start from what is released now: an attach mid-way sees only new output
            p, st = kernel.processes[pid], kernel.streams[pid]
            if from_now:
                sent_tokens, sent_chars = p.num_output_tokens, st.released
            elif new:  # only what this kernel produced: not a restored process's earlier output
                sent_tokens, sent_chars = p.output_tokens_at_start, st.released_at_start
            else:
                sent_tokens, sent_chars = 0, 0
        try:
            while True:
                with kernel.lock:
                    p = kernel.processes[pid]
                    s = kernel.streams[pid]
                    text = s.text[sent_chars:s.released]  # each follower keeps its own offsets
                    sent_chars = s.released
                    new_ids = p.output_token_ids[sent_tokens:]
                    new_lp = s.logprobs[sent_tokens:sent_tokens + len(new_ids)] if s.logprobs else []
                    sent_tokens += len(new_ids)
                    finished, reason = p.is_finished, p.finish_reason
                if text or new_ids or finished:
                    yield Update(text, list(new_ids), list(new_lp), finished, reason)
                if finished:
                    return
                await event.wait()
                event.clear()
        finally:
            with self._sub_lock:
                subs = self._subscribers.get(pid, [])
                if (loop, event) in subs:
                    subs.remove((loop, event))
                if not subs:
                    self._subscribers.pop(pid, None)

    async def wait(self, pid: int) -> Update:
        """Follow `pid` to its end; return everything it produced in one `Update`."""
        total = Update()
        async for u in self.follow(pid):
            total.text += u.text
            total.token_ids += u.token_ids
            total.logprobs += u.logprobs
            total.finished, total.finish_reason = u.finished, u.finish_reason
        return total
