"""The system-call API every front end uses: spawn, stream, wait, kill, ps.

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
          owner: str = "local") -> int:
    """Start a generation; returns its pid. Raises `InvalidRequestError` / `OutOfBlocksError`."""
    return kernel.spawn(prompt, params, owner).pid


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
    """Kill the caller's process `pid`; its KV blocks are free when this returns."""
    kernel.kill(pid, owner)


def ps(kernel: Kernel, owner: str | None = "local", all: bool = False) -> list[dict]:
    """The caller's processes (every owner's with owner=None: admins only)."""
    return kernel.ps(owner, all)
