"""The system-call API every front end uses: spawn, stream, wait, kill, ps, top, fork, suspend, resume,
hibernate, restore, nice.

Owns nothing but the calling convention: each call names an owner, and a caller only ever sees
or touches its own processes. The daemon (HTTP) and the shell (CLI) both call these functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from llmos.kernel.kernel import Kernel
from llmos.kernel.proc import Process
from llmos.model.sampling import SamplingParams


@dataclass
class Result:
    """A finished process: its text, token ids, why it stopped, and timings (seconds)."""

    pid: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    ttft_s: float | None
    total_s: float | None


def spawn(kernel: Kernel, prompt: str | list[int], params: SamplingParams | None = None,
          owner: str = "local", nice: int = 0, n: int = 1) -> int:
    """Start a generation; returns its pid. `n` > 1 samples n continuations (the others are forked from it
    when its prompt is done: `children`). Raises `InvalidRequestError` / `OutOfBlocksError` /
    `QuotaExceededError`."""
    return kernel.spawn(prompt, params, owner, nice=nice, n=n).pid


def stream(kernel: Kernel, pid: int, owner: str = "local") -> Iterator[str]:
    """Yield the process's text deltas as they are produced, driving the kernel while it has work.

    Every delta is whole UTF-8 text; their concatenation is the final output text.
    """
    p = kernel.get(pid, owner)
    while True:
        for delta in kernel.read(pid):
            yield delta
        if p.is_finished:
            for delta in kernel.read(pid):
                yield delta
            return
        kernel.step()


def wait(kernel: Kernel, pid: int, owner: str = "local") -> Result:
    """Block until the process ends; return its `Result`."""
    p = kernel.get(pid, owner)
    kernel.run_until_done([pid])
    return result(kernel, p)


def result(kernel: Kernel, p: Process) -> Result:
    s = kernel.streams[p.pid]
    ttft = p.first_token_time - p.arrival_time if p.first_token_time else None
    total = p.finish_time - p.arrival_time if p.finish_time else None
    return Result(p.pid, s.text, list(p.output_token_ids), p.finish_reason, p.num_prompt_tokens, ttft, total)


def kill(kernel: Kernel, pid: int, owner: str = "local") -> None:
    """Kill the caller's process `pid`; its KV blocks are free when this returns (a hibernated one's image is
    deleted)."""
    kernel.kill(pid, owner)


def ps(kernel: Kernel, owner: str | None = "local", all: bool = False) -> list[dict]:
    """The caller's processes (every owner's with owner=None: admins only)."""
    return kernel.ps(owner, all)


def children(kernel: Kernel, pid: int, owner: str = "local") -> list[int]:
    """Pids forked from the caller's process `pid` (by `fork`, or by parallel sampling)."""
    kernel.get(pid, owner)
    return kernel.children(pid)


def fork(kernel: Kernel, pid: int, n: int = 1, owner: str = "local") -> list[int]:
    """Make n children of the caller's live process, sharing its KV blocks copy-on-write; returns their pids."""
    return [c.pid for c in kernel.fork(pid, n, owner)]


def suspend(kernel: Kernel, pid: int, owner: str = "local") -> None:
    """Stop scheduling the caller's process; its K/V go to host swap (or are recomputed on resume)."""
    kernel.suspend(pid, owner)


def resume(kernel: Kernel, pid: int, owner: str = "local") -> None:
    """Queue the caller's suspended process again."""
    kernel.resume(pid, owner)


def hibernate(kernel: Kernel, pid: int, owner: str = "local") -> str:
    """Write the caller's process to disk and end it here; returns the image id for `restore`."""
    return kernel.hibernate(pid, owner)


def restore(kernel: Kernel, hid: str, owner: str = "local") -> int:
    """Bring back the caller's hibernated process `hid` (from this kernel or an earlier one); returns its new pid."""
    return kernel.restore(hid, owner).pid


def hibernated(kernel: Kernel, owner: str = "local") -> list[dict]:
    """The caller's hibernated processes on disk."""
    return kernel.hibernated(owner)


def nice(kernel: Kernel, pid: int, level: int, owner: str = "local") -> None:
    """Set the nice level (-20..19) of the caller's live process."""
    kernel.nice(pid, level, owner)


def top(kernel: Kernel, owner: str | None = "local") -> dict:
    """What `top` shows: the kernel's memory and scheduler state plus one row per live process (owner=None:
    every owner's, admins only)."""
    return {"memory": kernel.memory(owner), "processes": kernel.ps(owner), "steps": kernel.steps,
            "waiting": kernel.scheduler.num_waiting, "running": kernel.scheduler.num_running}
