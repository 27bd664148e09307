"""Processes: one generation request as a plain record plus its state machine.

Owns the `Process` record and every state change (named functions below, each
checking the source state). It must never touch the KV cache, the model or the
scheduler's queues: those belong to kvcache.py, runner.py and sched.py.

State diagram (xv6 style: no hidden transitions):

         admit()          start()            finish(p, reason)
    NEW ---------> READY ---------> RUNNING -------------------> FINISHED
     |             ^ ^ |  <-----------' |
     |             | | |   preempt()    |  suspend()
     |             | | '----------------+-----------> SUSPENDED
     |             | '---- resume() ----------------------'  |
     |             |                                         |  hibernate()
     |             |      (READY, RUNNING, SUSPENDED) -------+------------> HIBERNATED
     |             |                                                              | kill()
     '---- kill() -+---- (READY, RUNNING, SUSPENDED) -------------------> KILLED <'

    preempt() and suspend() keep `num_computed_tokens` when the caller kept the K/V (swapped them out to
    host memory) and zero it when the K/V were dropped (recompute). FINISHED and KILLED are final; a
    HIBERNATED process runs no more in this kernel but lives on as a file that a later kernel resumes as a new
    process, until it is killed (the caller deletes the file).

Token accounting: `token_ids` = prompt + output. `num_computed_tokens` of them have
their K/V written in the cache; a step computes `n <= num_tokens - num_computed_tokens`
more. When a step leaves `num_computed_tokens == num_tokens`, the runner samples one
new token and `append_token` makes it the next uncomputed one.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmos.model.sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "abort")  # for finish(); kill() uses "killed", hibernate() "hibernated"


class ProcState(enum.Enum):
    NEW = "new"
    READY = "ready"
    RUNNING = "running"
    SUSPENDED = "suspended"
    FINISHED = "finished"
    KILLED = "killed"
    HIBERNATED = "hibernated"


class InvalidTransitionError(RuntimeError):
    """A programming error: a state change was asked from a state that does not allow it."""


@dataclass(eq=False)
class Process:
    """One generation. Identity is the object (eq=False), so it can sit in sets and deques.

    Times are `time.monotonic()` seconds. `finish_reason` is one of "stop", "length",
    "abort" (set by finish), "killed" (set by kill) or "hibernated"; None while alive.
    """

    pid: int
    owner: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    state: ProcState = ProcState.NEW
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    parent: int | None = None  # pid this process was forked from
    output_tokens_at_start: int = 0  # output tokens it already had when it arrived (restored, forked)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"process {self.pid}: empty prompt (the kernel must reject it at spawn)")
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        self.token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V still have to be computed before the next sample (>= 1 while alive)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True unless the next step is a plain decode: exactly one uncomputed token after
        at least one computed one. A fresh or preempted process is in prefill, even with a
        one-token prompt; so is one whose recompute after preemption is not done yet."""
        return self.num_computed_tokens == 0 or self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        """Final for this kernel: FINISHED, KILLED or HIBERNATED (it holds no KV blocks)."""
        return self.state in (ProcState.FINISHED, ProcState.KILLED, ProcState.HIBERNATED)

    def __repr__(self) -> str:
        return (f"Process(pid={self.pid}, state={self.state.name}, tokens={self.num_prompt_tokens}"
                f"+{self.num_output_tokens}, computed={self.num_computed_tokens})")


def _transition(p: Process, allowed: tuple[ProcState, ...], new: ProcState, name: str) -> None:
    if p.state not in allowed:
        legal = "/".join(s.name for s in allowed)
        raise InvalidTransitionError(
            f"{name}(pid={p.pid}): process is {p.state.name}, {name} needs {legal}")
    p.state = new


def admit(p: Process) -> None:
    """NEW -> READY: the kernel accepted the process; it may now be queued."""
    _transition(p, (ProcState.NEW,), ProcState.READY, "admit")


def start(p: Process) -> None:
    """READY -> RUNNING: the scheduler gave it blocks and a place in the batch."""
    _transition(p, (ProcState.READY,), ProcState.RUNNING, "start")


def preempt(p: Process, keep_computed: bool = False) -> None:
    """RUNNING -> READY. By recompute (default): its K/V are gone (the caller freed its blocks), so every
    token, prompt and output alike, must be computed again. With `keep_computed` the caller swapped the
    K/V out to host memory and will swap them back in before the process runs again."""
    _transition(p, (ProcState.RUNNING,), ProcState.READY, "preempt")
    if not keep_computed:
        p.num_computed_tokens = 0
    p.num_preemptions += 1


def suspend(p: Process, keep_computed: bool) -> None:
    """READY/RUNNING -> SUSPENDED: not scheduled until resume(). `keep_computed` as for preempt()."""
    _transition(p, (ProcState.READY, ProcState.RUNNING), ProcState.SUSPENDED, "suspend")
    if not keep_computed:
        p.num_computed_tokens = 0


def resume(p: Process) -> None:
    """SUSPENDED -> READY: queue it again."""
    _transition(p, (ProcState.SUSPENDED,), ProcState.READY, "resume")


def hibernate(p: Process) -> None:
    """READY/RUNNING/SUSPENDED -> HIBERNATED (finish_reason "hibernated"): the caller wrote it to disk and
    freed its blocks; it is final for this kernel."""
    _transition(p, (ProcState.READY, ProcState.RUNNING, ProcState.SUSPENDED), ProcState.HIBERNATED, "hibernate")
    p.finish_reason = "hibernated"
    p.finish_time = time.monotonic()


def finish(p: Process, reason: str) -> None:
    """RUNNING -> FINISHED with reason "stop", "length" or "abort"; records finish_time."""
    if reason not in FINISH_REASONS:
        raise ValueError(f"finish(pid={p.pid}): reason {reason!r} is not one of {FINISH_REASONS}")
    _transition(p, (ProcState.RUNNING,), ProcState.FINISHED, "finish")
    p.finish_reason = reason
    p.finish_time = time.monotonic()


def kill(p: Process) -> None:
    """NEW/READY/RUNNING/SUSPENDED -> KILLED (finish_reason "killed"): the caller frees its blocks. Also
    HIBERNATED -> KILLED: the caller deletes its hibernation image."""
    _transition(p, (ProcState.NEW, ProcState.READY, ProcState.RUNNING, ProcState.SUSPENDED, ProcState.HIBERNATED),
                ProcState.KILLED, "kill")
    p.finish_reason = "killed"
    p.finish_time = time.monotonic()


def append_token(p: Process, token_id: int) -> None:
    """Append one sampled token to the output (and token_ids); the first sets first_token_time.
    Only a RUNNING process samples."""
    if p.state is not ProcState.RUNNING:
        raise InvalidTransitionError(f"append_token(pid={p.pid}): process is {p.state.name}, needs RUNNING")
    if p.first_token_time is None:
        p.first_token_time = time.monotonic()
    p.output_token_ids.append(token_id)
    p.token_ids.append(token_id)
