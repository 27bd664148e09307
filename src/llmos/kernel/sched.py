"""The scheduler: which processes compute how many tokens this step, and who gets preempted.

Owns the `waiting` and `running` queues and asks the BlockManager for blocks. It must
never run the model, sample, or change `num_computed_tokens` (the kernel does, after
the step), and it changes process state only through proc.start / proc.preempt.

Policy (continuous batching, after vLLM v1 and nano-vllm):
  - Every step is one batch under a token budget (`max_num_batched_tokens`) and at
    most `max_num_seqs` running processes. Decodes and prefill chunks share the batch.
  - Running processes go first, oldest arrival first: each gets the tokens it still
    needs (1 for a decode), cut to the remaining budget and to `prefill_chunk_size`
    (chunked prefill: a long prompt is computed over several steps).
  - When a running process needs a block and none is free, the NEWEST running process
    (latest arrival, maybe the one being scheduled) is preempted by recompute: its
    blocks are freed, its computed tokens forgotten, and it goes to the FRONT of
    waiting. Oldest-first service means the oldest process always makes progress, so
    every process that `fits` the pool alone eventually finishes.
  - Then waiting processes are admitted from the front (FCFS, possibly with a partial
    chunk) while budget, seats and free blocks allow. A step that preempted admits
    nobody, so a preempted process is never re-admitted in the same step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmos.kernel import proc
from llmos.kernel.kvcache import BlockManager
from llmos.kernel.proc import Process, ProcState


@dataclass
class ScheduledBatch:
    """One step's work. `items`: (process, n new tokens to compute), decodes first
    (n == 1 after at least one computed token), then prefill chunks. `preempted`:
    processes preempted this step, in the order it happened."""

    items: list[tuple[Process, int]] = field(default_factory=list)
    preempted: list[Process] = field(default_factory=list)

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


class Scheduler:
    """FCFS continuous-batching scheduler with chunked prefill and preemption by recompute
    of the newest process (see the module docstring)."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, prefill_chunk_size: int | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or (prefill_chunk_size is not None and prefill_chunk_size < 1):
            raise ValueError(f"Scheduler limits must be >= 1: max_num_seqs={max_num_seqs}, "
                             f"max_num_batched_tokens={max_num_batched_tokens}, prefill_chunk_size={prefill_chunk_size}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.waiting: deque[Process] = deque()
        self.running: list[Process] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fits(self, p: Process) -> bool:
        """Could p (prompt + max_tokens tokens) ever fit in the whole pool, alone?
        The kernel refuses a process that does not (OutOfBlocksError) before add()."""
        bm = self.block_manager
        return bm.blocks_needed(p.num_prompt_tokens + p.params.max_tokens) <= bm.num_blocks

    def add(self, p: Process) -> None:
        """Queue a READY process at the back of waiting."""
        if p.state is not ProcState.READY:
            raise proc.InvalidTransitionError(f"Scheduler.add(pid={p.pid}): process is {p.state.name}, needs READY")
        self.waiting.append(p)

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

    def schedule(self) -> ScheduledBatch:
        """Pick this step's batch; grow block tables to cover it; preempt if blocks run out."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens

        # (a) running processes, oldest first; the newest sits at the tail, ready to be preempted.
        self.running.sort(key=_age)
        i = 0
        while i < len(self.running) and budget > 0:
            p = self.running[i]
            n = self._num_new_tokens(p, budget)
            if not self._grow_or_preempt(p, n, batch.preempted):
                break  # p preempted itself: it was the newest, nothing after it
            batch.items.append((p, n))
            budget -= n
            i += 1

        # (b) admit from the front of waiting (none after a preemption this step).
        while (self.waiting and budget > 0 and not batch.preempted
               and len(self.running) < self.max_num_seqs):
            p = self.waiting[0]
            n = self._num_new_tokens(p, budget)
            if not self.block_manager.can_allocate(p.pid, p.num_computed_tokens + n):
                break
            self.waiting.popleft()
            self.block_manager.allocate(p.pid, p.num_computed_tokens + n)
            proc.start(p)
            self.running.append(p)
            batch.items.append((p, n))
            budget -= n

        batch.items.sort(key=lambda item: not _is_decode(item))  # stable: decodes first
        return batch

    def _num_new_tokens(self, p: Process, budget: int) -> int:
        n = p.num_uncomputed_tokens
        if n < 1:
            raise RuntimeError(f"pid {p.pid} has no token to compute: the kernel must append the "
                               f"sampled token or finish the process after each step")
        if self.prefill_chunk_size is not None:
            n = min(n, self.prefill_chunk_size)
        return min(n, budget)

    def _grow_or_preempt(self, p: Process, n: int, preempted: list[Process]) -> bool:
        """Cover p's first num_computed_tokens + n tokens with blocks, preempting the newest
        running process until they fit. False if p itself was preempted."""
        need = p.num_computed_tokens + n
        while not self.block_manager.can_allocate(p.pid, need):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is p:
                return False
        self.block_manager.allocate(p.pid, need)
        return True

    def _preempt(self, p: Process) -> None:
        """Preempt by recompute: free p's blocks, forget its computed tokens, requeue at the front."""
        self.block_manager.free(p.pid)
        proc.preempt(p)
        self.waiting.appendleft(p)
