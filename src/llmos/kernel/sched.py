"""The scheduler: which processes compute how many tokens this step, and who gets preempted.

Owns the `waiting` and `running` queues and asks the BlockManager for blocks. It must
never run the model, sample, or change `num_computed_tokens` (the kernel does, after
the step), and it changes process state only through proc.start / proc.preempt.

Mechanism (continuous batching, after vLLM v1 and nano-vllm), the same under every policy:
  - Every step is one batch under a token budget (`max_num_batched_tokens`) and at
    most `max_num_seqs` running processes. Decodes and prefill chunks share the batch.
  - Running processes go first, in the policy's service order: each gets the tokens it
    still needs (1 for a decode), cut to the remaining budget and to `prefill_chunk_size`
    (chunked prefill: a long prompt is computed over several steps).
  - When a running process needs a block and none is free, the policy's victim among the
    processes served after it this step (itself when it is the last) is preempted by
    recompute: its blocks are freed, its computed tokens forgotten, and it goes to the
    FRONT of waiting. The first process in service order is never the victim of a block
    shortage while another runs, so it always makes progress.
  - Then waiting processes are admitted in the policy's order (possibly with a partial
    chunk) while budget, seats and free blocks allow; the first one that does not fit stops
    admission (no overtaking, so a big process is not starved by small ones). A step that
    preempted for blocks admits nobody, and a process preempted in a step is never
    re-admitted in the same step.
  - A waiting process that outranks a running one (only `priority` has such a rank) is
    served before it, as if it were running: it takes budget first, and when it lacks a
    seat or blocks it preempts the policy's victims among the processes it outranks.
  - Round robin (`rr_quantum` tokens, any policy): at the start of a step, while the next
    waiting process could not be admitted, a running process that has decoded
    `rr_quantum` tokens since it was admitted (and does not outrank that waiting process)
    is preempted to the BACK of waiting.

Policies (one small class each; pass a name or a `Policy` object):
  fcfs      oldest arrival first; victim: the newest (the behaviour before policies existed).
  priority  Unix nice levels -20..19, lower is more important, aged while waiting.
  fair      Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language
            Models", OSDI 2024): serve the owner that has been served least.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llmos.errors import InvalidRequestError
from llmos.kernel import proc
from llmos.kernel.kvcache import BlockManager
from llmos.kernel.proc import Process, ProcState

NICE_MIN, NICE_MAX = -20, 19
DEFAULT_AGING_S = 10.0  # priority: one nice level of bonus per 10 s spent waiting


class SchedulingError(InvalidRequestError, ValueError):
    """A bad policy name, nice level or scheduler setting (a ValueError too)."""


@dataclass
class ScheduledBatch:
    """One step's work. `items`: (process, n new tokens to compute), decodes first
    (n == 1 after at least one computed token), then prefill chunks. `preempted`:
    processes preempted this step, in the order it happened; `reasons[pid]` says why:
    "blocks" (a running process needed a block), "priority" (a waiting process that
    outranks it took its place) or "quantum" (round robin). `admitted`: waiting
    processes started this step."""

    items: list[tuple[Process, int]] = field(default_factory=list)
    preempted: list[Process] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)
    admitted: list[Process] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items


def _is_decode(item: tuple[Process, int]) -> bool:
    p, n = item
    return n == 1 and p.num_computed_tokens > 0


def _age(p: Process) -> tuple[float, int]:
    return (p.arrival_time, p.pid)


def check_nice(level: int) -> int:
    """`level` if it is an int nice level in [-20, 19]; else SchedulingError."""
    if isinstance(level, bool) or not isinstance(level, int) or not NICE_MIN <= level <= NICE_MAX:
        raise SchedulingError(f"nice level {level!r} is out of range: give an integer from {NICE_MIN} "
                              f"(most important) to {NICE_MAX} (least important)")
    return level


# ---------------------------------------------------------------- policies

class Policy:
    """What a scheduling policy decides; the Scheduler does the rest (see the module docstring).

    The defaults are FCFS. A policy object serves one Scheduler, which calls `attach` once and
    then the hooks: `on_add` (before p joins waiting), `on_admit` (p just started),
    `on_preempt` (p just went back to waiting), `on_remove` (p finished or was killed) and
    `on_scheduled` (p computes n tokens this step; `decode` says whether it is a decode).
    """

    name = "fcfs"
    preempts = False  # True when may_preempt can ever be True: waiting processes may outrank running ones

    def attach(self, sched: Scheduler) -> None:
        self.sched = sched

    def begin_step(self, now: float) -> None:
        """Called at the start of every schedule() with the scheduler's clock (seconds)."""

    def order_key(self, p: Process):
        """Sort key of a running process: served in ascending order (best first)."""
        return _age(p)

    def pick(self, waiting: Sequence[Process]) -> Process:
        """The waiting process to admit next (`waiting` is non-empty, in queue order)."""
        return waiting[0]

    def victim(self, candidates: list[Process]) -> Process:
        """Which of the running `candidates` (non-empty) to preempt: by default the last in service order."""
        return max(candidates, key=self.order_key)

    def may_preempt(self, w: Process, r: Process) -> bool:
        """Does process `w` outrank running process `r` (serve w first, preempt r for w)?"""
        return False

    def on_add(self, p: Process) -> None: ...

    def on_admit(self, p: Process) -> None: ...

    def on_preempt(self, p: Process) -> None: ...

    def on_remove(self, p: Process) -> None: ...

    def on_scheduled(self, p: Process, n: int, decode: bool) -> None: ...


class FcfsPolicy(Policy):
    """First come, first served: oldest arrival first, the newest is the victim."""


class PriorityPolicy(Policy):
    """Unix-style priorities (nice(2)): `Process.priority` is a nice level from -20 (most
    important) to 19 (least); lower is served first.

    Effective priority = nice minus an aging bonus, clamped at -20. A waiting process earns one
    level per `aging_s` seconds (of the scheduler's clock) spent waiting since it was added or
    last preempted, so nothing waits forever (aging, as in classic Unix schedulers); a running
    process keeps the bonus it had when admitted. `aging_s=None` turns aging off.

    Running processes are served best first (then oldest); the victim is the worst, then newest;
    waiting processes are admitted best first (then in queue order). A waiting process outranks
    a running one (see the module docstring) when both its effective priority and its nice level
    are strictly better: a higher-priority arrival preempts, an aged equal does not, and a process
    admitted thanks to aging keeps its bonus, so fresher arrivals do not starve it again.
    """

    name = "priority"
    preempts = True

    def __init__(self, aging_s: float | None = DEFAULT_AGING_S):
        if aging_s is not None and not (isinstance(aging_s, (int, float)) and math.isfinite(aging_s) and aging_s > 0):
            raise SchedulingError(f"aging_s must be a positive number of seconds or None (no aging), got {aging_s!r}")
        self.aging_s = aging_s
        self.now = 0.0
        self._since: dict[int, float] = {}  # pid -> clock when it last started waiting
        self._bonus: dict[int, int] = {}    # pid -> aging bonus it was admitted with (running processes)

    def begin_step(self, now: float) -> None:
        self.now = now

    def _waited_bonus(self, p: Process) -> int:
        if self.aging_s is None:
            return 0
        return max(0, int((self.now - self._since.get(p.pid, self.now)) // self.aging_s))

    def effective(self, p: Process) -> int:
        """Nice level minus the aging bonus, clamped at -20 (as of the current step)."""
        bonus = self._bonus.get(p.pid, 0) if p.state is ProcState.RUNNING else self._waited_bonus(p)
        return max(NICE_MIN, p.priority - bonus)

    def order_key(self, p: Process):
        return (self.effective(p), p.arrival_time, p.pid)

    def pick(self, waiting: Sequence[Process]) -> Process:
        return min(enumerate(waiting), key=lambda ip: (self.effective(ip[1]), ip[0]))[1]

    def may_preempt(self, w: Process, r: Process) -> bool:
        # Aging orders admission but never lets a process preempt one of equal or better nice:
        # equals would otherwise preempt each other in turn as they age.
        return w.priority < r.priority and self.effective(w) < self.effective(r)

    def on_add(self, p: Process) -> None:
        self._since[p.pid] = self.sched.clock()

    def on_admit(self, p: Process) -> None:
        self._bonus[p.pid] = self._waited_bonus(p)

    def on_preempt(self, p: Process) -> None:
        self._since[p.pid] = self.sched.clock()
        self._bonus.pop(p.pid, None)

    def on_remove(self, p: Process) -> None:
        self._since.pop(p.pid, None)
        self._bonus.pop(p.pid, None)


class FairPolicy(Policy):
    """Virtual Token Counter, VTC (Sheng et al., "Fairness in Serving Large Language Models",
    OSDI 2024, arXiv:2401.00588; the artifact's `vtc_req_queue.py`).

    One counter per owner (`counters`): the weighted tokens it has been served, `w_p` per prefill
    token and `w_q` per decode token, charged as they are scheduled (a recompute after preemption
    is prefill, and is charged again: it is work done for that owner). Admission takes the
    owner with the smallest counter among those with a waiting process ("backlogged"),
    FIFO within an owner. When an owner with nothing waiting gets a new process, its counter is
    lifted to max(own, min over the backlogged owners), or to the counter of the owner that
    last left the queue when no one is backlogged, so idle time is not banked (the paper's
    counter lift). Running processes are served oldest first, as under fcfs; the victim is
    the newest process of the owner with the largest counter.

    Fairness bound (the paper's theorem for VTC, as we read and use it): for two owners f, g
    backlogged during [t1, t2), |W_f(t1, t2) - W_g(t1, t2)| <= 2U with
    U = max(w_p * L_input, w_q * M), where W is weighted service, L_input the longest prompt
    and M the most tokens that fit in the running batch (here the KV pool: num_blocks *
    block_size); the paper calls the bound tight within 2x. Two differences from
    the paper's setting: prefill is charged per chunk as scheduled, not all at admission, and
    the paper never preempts (it reserves memory for the whole output), so with preemption by
    recompute the bound is a target we measure (llmos.bench.sim), not a theorem. See `vtc_bound`.
    """

    name = "fair"

    def __init__(self, w_p: float = 1.0, w_q: float = 2.0):
        if not (w_p > 0 and w_q > 0):
            raise SchedulingError(f"VTC weights must be > 0, got w_p={w_p!r}, w_q={w_q!r}")
        self.w_p, self.w_q = float(w_p), float(w_q)
        self.counters: dict[str, float] = {}
        self._last_left: str | None = None  # owner whose last waiting process was admitted most recently

    def pick(self, waiting: Sequence[Process]) -> Process:
        first: dict[str, Process] = {}
        for q in waiting:
            first.setdefault(q.owner, q)
        owner = min(first, key=lambda o: self.counters.get(o, 0.0))  # ties: the owner queued first
        return first[owner]

    def victim(self, candidates: list[Process]) -> Process:
        return max(candidates, key=lambda p: (self.counters.get(p.owner, 0.0), _age(p)))

    def on_add(self, p: Process) -> None:
        waiting = self.sched.waiting
        c = self.counters.setdefault(p.owner, 0.0)
        if any(q.owner == p.owner for q in waiting):
            return  # already backlogged: no lift
        backlogged = [self.counters.get(q.owner, 0.0) for q in waiting]
        if backlogged:
            self.counters[p.owner] = max(c, min(backlogged))
        elif self._last_left is not None:
            self.counters[p.owner] = max(c, self.counters.get(self._last_left, 0.0))

    def on_admit(self, p: Process) -> None:
        if not any(q.owner == p.owner for q in self.sched.waiting):
            self._last_left = p.owner

    def on_scheduled(self, p: Process, n: int, decode: bool) -> None:
        self.counters[p.owner] = self.counters.get(p.owner, 0.0) + n * (self.w_q if decode else self.w_p)


POLICIES: dict[str, type[Policy]] = {"fcfs": FcfsPolicy, "priority": PriorityPolicy, "fair": FairPolicy}


def make_policy(policy: str | Policy, aging_s: float | None = DEFAULT_AGING_S) -> Policy:
    """A Policy object from a name in POLICIES (`aging_s` goes to priority) or the object itself.
    Raises SchedulingError (a ValueError) for an unknown name."""
    if isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise SchedulingError(f"unknown scheduling policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    return PriorityPolicy(aging_s) if policy == "priority" else POLICIES[policy]()


def vtc_bound(max_prompt_tokens: int, kv_capacity_tokens: int, w_p: float = 1.0, w_q: float = 2.0) -> float:
    """2U, the VTC fairness bound in weighted tokens (Sheng et al. 2024; see FairPolicy):
    U = max(w_p * L_input, w_q * M), L_input = `max_prompt_tokens`, M = `kv_capacity_tokens`
    (what fits in the running batch: num_blocks * block_size). The paper proves it, for a scheduler
    that never preempts, for two owners that both have a waiting process over the whole interval."""
    return 2.0 * max(w_p * max_prompt_tokens, w_q * kv_capacity_tokens)


# ---------------------------------------------------------------- memory hooks


class MemoryHooks:
    """What the scheduler asks its owner (the kernel) about memory; these defaults keep it self-contained.

    - `may_admit(p, num_tokens)`: may p hold blocks for `num_tokens` tokens (per-owner limits)? Default yes.
    - `prefer_swap(p)`: preempt p by swapping its K/V to host memory (True) or by recompute (False)?
      Asked only when the swap space has room. Default: recompute.
    - `cache_salt(p)`: the prefix-cache salt of p's blocks; only equal salts share. Default: the owner.
    """

    def may_admit(self, p: Process, num_tokens: int) -> bool:
        return True

    def prefer_swap(self, p: Process) -> bool:
        return False

    def cache_salt(self, p: Process) -> str:
        return p.owner


# ---------------------------------------------------------------- the scheduler

class Scheduler:
    """Continuous-batching scheduler with chunked prefill, preemption by recompute and a
    pluggable policy (see the module docstring).

    `policy`: "fcfs", "priority", "fair" or a Policy object. `clock`: seconds, for aging
    (inject a virtual clock in simulations). `rr_quantum`: decode tokens per turn when others
    wait (None = off). `aging_s`: seconds of waiting per nice level of bonus when `policy` is
    "priority" (None = no aging; a Policy object brings its own). `memory`: the kernel's
    MemoryHooks (per-owner limits, swap-or-recompute, prefix-cache salt). Raises SchedulingError
    (a ValueError) for bad settings.

    Memory: a process admitted with no computed tokens first takes the prefix cache's matching
    blocks (BlockManager.allocate_prefix) and computes only the rest; a process whose K/V were
    swapped out is swapped back in on admission; a preempted process is swapped out when
    `memory.prefer_swap` says so and the swap space has room, else recomputed. Growth passes
    `write_from`, so a write into a block shared after a fork copies it first (copy-on-write).
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, prefill_chunk_size: int | None = None,
                 policy: str | Policy = "fcfs", clock: Callable[[], float] = time.monotonic,
                 rr_quantum: int | None = None, aging_s: float | None = DEFAULT_AGING_S,
                 memory: MemoryHooks | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or (prefill_chunk_size is not None and prefill_chunk_size < 1):
            raise ValueError(f"Scheduler limits must be >= 1: max_num_seqs={max_num_seqs}, "
                             f"max_num_batched_tokens={max_num_batched_tokens}, prefill_chunk_size={prefill_chunk_size}")
        if rr_quantum is not None and (isinstance(rr_quantum, bool) or not isinstance(rr_quantum, int)
                                       or rr_quantum < 1):
            raise SchedulingError(f"rr_quantum must be a number of tokens >= 1 or None (off), got {rr_quantum!r}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.clock = clock
        self.rr_quantum = rr_quantum
        self.policy = make_policy(policy, aging_s)
        self.policy.attach(self)
        self.memory = memory or MemoryHooks()
        self.waiting: deque[Process] = deque()
        self.running: list[Process] = []
        self._decoded: dict[int, int] = {}  # pid -> decode tokens scheduled since it was admitted
        self._batch: ScheduledBatch | None = None  # the batch schedule() is building

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def counters(self) -> dict[str, float]:
        """A copy of the VTC counters (owner -> weighted tokens served), {} under other policies."""
        return dict(getattr(self.policy, "counters", {}))

    def fits(self, p: Process) -> bool:
        """Could p (prompt + max_tokens tokens) ever fit in the whole pool, alone?
        The kernel refuses a process that does not (OutOfBlocksError) before add()."""
        bm = self.block_manager
        return bm.blocks_needed(p.num_prompt_tokens + p.params.max_tokens) <= bm.num_blocks

    def add(self, p: Process, front: bool = False) -> None:
        """Queue a READY process at the back of waiting (the front with `front`, e.g. a forked child
        that already holds blocks). Raises SchedulingError when its priority is not a nice level (-20..19)."""
        if p.state is not ProcState.READY:
            raise proc.InvalidTransitionError(f"Scheduler.add(pid={p.pid}): process is {p.state.name}, needs READY")
        check_nice(p.priority)
        self.policy.on_add(p)
        if front:
            self.waiting.appendleft(p)
        else:
            self.waiting.append(p)

    def add_running(self, p: Process) -> None:
        """Put a READY process that already holds its blocks (a child forked from a running process)
        straight onto running: READY -> RUNNING. It may briefly exceed max_num_seqs."""
        check_nice(p.priority)
        self.policy.on_add(p)
        proc.start(p)
        self.running.append(p)
        self._decoded[p.pid] = 0
        self.policy.on_admit(p)

    def dequeue(self, p: Process) -> None:
        """Take a live process off whichever queue holds it without touching its blocks (the kernel
        suspends it: it swaps or frees them itself)."""
        if p in self.running:
            self.running.remove(p)
        elif p in self.waiting:
            self.waiting.remove(p)
        self._decoded.pop(p.pid, None)
        self.policy.on_preempt(p)

    def remove(self, p: Process) -> None:
        """Drop a FINISHED or KILLED process from whichever queue holds it and free its
        blocks at once. Not being queued is fine (e.g. killed before add)."""
        if not p.is_finished:
            raise proc.InvalidTransitionError(f"Scheduler.remove(pid={p.pid}): process is {p.state.name}; "
                                              f"finish or kill it first")
        if p in self.running:
            self.running.remove(p)
        elif p in self.waiting:
            self.waiting.remove(p)
        self.block_manager.free(p.pid)
        self._decoded.pop(p.pid, None)
        self.policy.on_remove(p)

    def renice(self, p: Process, level: int) -> None:
        """Set p's nice level (-20 most important .. 19 least); it counts from the next
        schedule(). Raises SchedulingError (a ValueError) for a level out of range."""
        p.priority = check_nice(level)

    def schedule(self) -> ScheduledBatch:
        """Pick this step's batch; grow block tables to cover it; preempt if blocks run out,
        for a process that outranks, or for round robin."""
        batch = self._batch = ScheduledBatch()
        self.policy.begin_step(self.clock())
        if self.rr_quantum is not None:
            self._expire_quanta()
        budget = self.max_num_batched_tokens

        # (a) running processes in service order; the policy's victims sit at the tail.
        self.running.sort(key=self.policy.order_key)
        w = self._pick() if self.policy.preempts else None  # a waiting process that may go before running ones
        i = 0
        while i < len(self.running) and budget > 0:
            p = self.running[i]
            if w is not None and self.policy.may_preempt(w, p):
                n = self._admit_over(w, self._num_new_tokens(w, budget), i)
                if n:  # w outranks running[i:]: it goes before them
                    self.running.remove(w)
                    self.running.insert(i, w)
                    self._serve(w, n, batch, admitted=True)
                    budget -= n
                    i += 1
                    w = self._pick()
                else:
                    w = None  # it does not fit even so: no one overtakes this step
                continue
            n = self._num_new_tokens(p, budget)
            if not self._grow_or_preempt(p, n):
                break  # p preempted itself: it was the last, nothing after it
            self._serve(p, n, batch)
            budget -= n
            i += 1

        # (b) admit in the policy's order (none after a preemption for blocks this step).
        while budget > 0 and len(self.running) < self.max_num_seqs and "blocks" not in batch.reasons.values():
            w = self._pick()
            if w is None:
                break
            n = self._admit(w, self._num_new_tokens(w, budget))
            if not n:
                break
            self._serve(w, n, batch, admitted=True)
            budget -= n

        batch.items.sort(key=lambda item: not _is_decode(item))  # stable: decodes first
        self._batch = None
        return batch

    def _pick(self) -> Process | None:
        """The policy's next waiting process, never one preempted in this step."""
        skip = self._batch.reasons if self._batch is not None else {}
        waiting = [q for q in self.waiting if q.pid not in skip] if skip else self.waiting
        return self.policy.pick(waiting) if waiting else None

    def _serve(self, p: Process, n: int, batch: ScheduledBatch, admitted: bool = False) -> None:
        decode = not p.is_prefill
        if decode:
            self._decoded[p.pid] = self._decoded.get(p.pid, 0) + 1
        self.policy.on_scheduled(p, n, decode)
        batch.items.append((p, n))
        if admitted:
            batch.admitted.append(p)

    def _num_new_tokens(self, p: Process, budget: int) -> int:
        n = p.num_uncomputed_tokens
        if n < 1:
            raise RuntimeError(f"pid {p.pid} has no token to compute: the kernel must append the "
                               f"sampled token or finish the process after each step")
        if self.prefill_chunk_size is not None:
            n = min(n, self.prefill_chunk_size)
        return min(n, budget)

    def _admit(self, p: Process, n: int) -> int:
        """Start waiting process p with blocks for its next n tokens (READY -> RUNNING, onto
        running). Returns the tokens it computes this step: n, or fewer when the prefix cache
        already holds the head of its prompt. 0, changing nothing, when the blocks are not free
        or its owner is at their block limit."""
        bm = self.block_manager
        need = p.num_computed_tokens + n
        if not self.memory.may_admit(p, need):
            return 0
        if bm.is_swapped(p.pid):
            if not bm.can_swap_in(p.pid, need):
                return 0
            bm.swap_in(p.pid, need)
        elif p.num_computed_tokens == 0 and not bm.block_table(p.pid):
            hit = bm.allocate_prefix(p.pid, p.token_ids, need, self.memory.cache_salt(p))
            if hit is None:
                return 0
            if hit:
                n = min(n, p.num_tokens - hit)
                if not bm.can_allocate(p.pid, hit + n):
                    bm.free(p.pid)
                    return 0
                bm.allocate(p.pid, hit + n)
                p.num_computed_tokens = hit
        else:
            if not bm.can_allocate(p.pid, need, write_from=p.num_computed_tokens):
                return 0
            bm.allocate(p.pid, need, write_from=p.num_computed_tokens)
        self.waiting.remove(p)
        proc.start(p)
        self.running.append(p)
        self._decoded[p.pid] = 0
        self.policy.on_admit(p)
        return n

    def _admit_over(self, w: Process, n: int, i: int) -> int:
        """Admit w ahead of running[i:] (all of which it outranks), preempting the policy's
        victims among them while w lacks a seat or blocks. Returns its tokens this step (see
        _admit), 0 if it still cannot start."""
        while True:
            if len(self.running) < self.max_num_seqs:
                got = self._admit(w, n)
                if got:
                    return got
            rest = self.running[i:]
            if not rest:
                return 0
            victim = self.policy.victim(rest)
            if not self.policy.may_preempt(w, victim):
                return 0
            self._preempt(victim, "priority")

    def _grow_or_preempt(self, p: Process, n: int) -> bool:
        """Cover running p's first num_computed_tokens + n tokens with blocks, preempting the
        policy's victim among the processes served after p (p itself when it is the last)
        until they fit; when p's owner is at their block limit (`memory.may_admit`), the victim
        is one of that owner's own processes. False if p itself was preempted."""
        bm = self.block_manager
        need, start = p.num_computed_tokens + n, p.num_computed_tokens
        while True:
            over_limit = not self.memory.may_admit(p, need)
            if not over_limit and bm.can_allocate(p.pid, need, write_from=start):
                break
            rest = self.running[self.running.index(p) + 1:]
            if over_limit:
                rest = [q for q in rest if q.owner == p.owner]
            victim = self.policy.victim(rest) if rest else p
            self._preempt(victim, "blocks")
            if victim is p:
                return False
        bm.allocate(p.pid, need, write_from=start)
        return True

    def _preempt(self, p: Process, reason: str = "blocks") -> None:
        """Preempt running p: swap its K/V out to host memory when `memory.prefer_swap(p)` and the
        swap space has room (it keeps its computed tokens), else by recompute (free its blocks,
        forget its computed tokens); requeue it at the FRONT of waiting (at the back for an expired
        round-robin quantum)."""
        self.running.remove(p)
        bm = self.block_manager
        swap = p.num_computed_tokens > 0 and bm.can_swap_out(p.pid) and self.memory.prefer_swap(p)
        if swap:
            bm.swap_out(p.pid)
        else:
            bm.free(p.pid)
        proc.preempt(p, keep_computed=swap)
        if reason == "quantum":
            self.waiting.append(p)
        else:
            self.waiting.appendleft(p)
        self._decoded.pop(p.pid, None)
        self.policy.on_preempt(p)
        if self._batch is not None:
            self._batch.preempted.append(p)
            self._batch.reasons[p.pid] = reason

    def _expire_quanta(self) -> None:
        """Round robin: while the next waiting process could not be admitted now, preempt (to
        the back of waiting) a running process whose quantum is used up and that does not
        outrank it; the policy picks which."""
        while self.waiting:
            w = self._pick()
            if w is None or self._could_admit(w):
                return
            expired = [q for q in self.running if self._decoded.get(q.pid, 0) >= self.rr_quantum
                       and not self.policy.may_preempt(q, w)]
            if not expired:
                return
            self._preempt(self.policy.victim(expired), "quantum")

    def _could_admit(self, w: Process) -> bool:
        """Would w get a seat, budget after the running processes' tokens, and blocks for its first chunk?"""
        if len(self.running) >= self.max_num_seqs:
            return False
        chunk = self.prefill_chunk_size or self.max_num_batched_tokens
        budget = self.max_num_batched_tokens - sum(min(q.num_uncomputed_tokens, chunk) for q in self.running)
        if budget <= 0:
            return False
        need = w.num_computed_tokens + self._num_new_tokens(w, budget)
        if self.block_manager.is_swapped(w.pid):
            return self.block_manager.can_swap_in(w.pid, need)
        return self.block_manager.can_allocate(w.pid, need, write_from=w.num_computed_tokens)
