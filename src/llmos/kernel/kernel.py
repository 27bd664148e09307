"""The kernel loop: admit -> schedule -> run -> sample -> stream -> retire, and the process system calls
(spawn, fork, suspend, resume, hibernate, restore, nice, kill).

Owns the process table, the model, the KV pool and its host swap pool, every process's output stream and
the hibernation store. Each `step()` runs one batch; a finished or killed process gives back its blocks in
the same step. Never parses user-facing input formats (that is the front ends' job) and never sleeps.

A recurrent model (the LSTM) gets a StatePool instead of a KV pool, sized from the same `kv_memory` budget:
its blocks are state slots, one per process whatever its length (block size = the context length; see
kvcache.py, "State slots"), with the prefix cache off. Everything below (preemption, swap, suspend, fork,
hibernate, per-owner block limits) then works on slots unchanged; `KernelConfig.block_size` is ignored.

Memory policy (what happens when the KV pool runs out), stated once here and in docs/design.md:
  - The scheduler's policy picks the victim (fcfs: the newest running process; priority: the
    worst-priority one; fair: the newest of the most-served owner).
  - The victim is preempted by SWAP when the host swap pool has room for all its blocks and swapping is
    cheaper than recomputing by the cost rule below; otherwise by RECOMPUTE (its blocks are dropped and
    its tokens computed again when it runs next). So when even swap is full, preemption still works: it
    falls back to recompute, and no running process is ever refused.
  - Cost rule (`Kernel.prefer_swap`): swapping n blocks costs about 2 * n * bytes_per_block / B seconds
    (out and back in, B = the measured host copy bandwidth, 4 GB/s until a swap has been timed); recompute
    costs about num_computed_tokens * t_prefill seconds (t_prefill = measured prefill seconds per token,
    1e-4 until a prefill step has been timed). Swap when it is the cheaper one.
  - A request is refused at spawn (`OutOfBlocksError`) only when it could never fit in the pool alone,
    and (`QuotaExceededError`) when its owner is at their process limit or the request alone exceeds their
    block limit. A process of an owner at their block limit waits, it is not refused.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from llmos.errors import (HibernationError, InvalidRequestError, OutOfBlocksError, ProcessNotFoundError,
                          QuotaExceededError)
from llmos.kernel import proc
from llmos.kernel.hibernate import (HibernationImage, HibernationStore, default_store, model_fingerprint,
                                    scatter_kv, scatter_state, weights_fingerprint)
from llmos.kernel.kvcache import BlockManager, KVPool, StatePool, SwapPool, parse_memory_budget
from llmos.kernel.proc import Process, ProcState
from llmos.kernel.runner import ModelRunner
from llmos.kernel.sched import MemoryHooks, Scheduler
from llmos.model.loader import load_model
from llmos.model.sampling import SamplingParams, find_stop
from llmos.model.tokenizer import IncrementalDetokenizer, Tokenizer

POLICIES = ("fcfs", "priority", "fair")


@dataclass
class KernelConfig:
    """Kernel settings, validated once at the edge.

    `kv_memory`: KV pool budget: bytes, a size string ("2GiB") or a fraction of free memory (0.3).
    `swap_memory`: host swap pool budget, same forms; 0 disables swapping (preemption then recomputes).
    `block_size`: tokens per KV block (ignored for a recurrent model: one state slot per process).
    `max_num_seqs`: running processes at most.
    `max_num_batched_tokens`: the per-step token budget (prefill chunks + decodes).
    `policy`: "fcfs", "priority" or "fair" (see sched.py). `rr_quantum`: preempt a process that decoded
    this many tokens while others wait (round robin; None = off). `enable_prefix_cache`: share full
    blocks of identical prompt prefixes within an owner. `max_processes_per_owner` /
    `max_blocks_per_owner`: per-owner limits (None = none). `hibernate_dir`: where hibernated processes
    go (default LLMOS_HOME). `keep_finished`: ended processes kept for `ps -a` and late readers; older
    ones are reaped (a long-running daemon's process table stays bounded).
    """

    kv_memory: str | int | float = "0.25"
    swap_memory: str | int | float = "256MiB"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    policy: str = "fcfs"
    rr_quantum: int | None = None
    enable_prefix_cache: bool = True
    max_processes_per_owner: int | None = None
    max_blocks_per_owner: int | None = None
    device: str | None = None
    dtype: str | None = None
    hibernate_dir: str | None = None
    keep_finished: int = 1024


@dataclass
class Stream:
    """One process's output: text deltas waiting to be read, and per-token times (seconds, monotonic)."""

    detokenizer: IncrementalDetokenizer
    held: int = 0  # characters of detokenizer text not yet released (a stop string may be forming)
    released: int = 0  # characters of output text released to readers
    text: str = ""
    deltas: deque[str] = field(default_factory=deque)
    token_times: list[float] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per output token
    released_at_start: int = 0  # characters it already had when it arrived (a restored process's old text)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` as a torch device (None: cuda when available, else cpu).

    Raises `InvalidRequestError` for any other name, or for CUDA on a machine without it.
    """
    if name is None:
        return default_device()
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name.strip())
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise InvalidRequestError(f"device {name!r} is not supported; use cpu, cuda or cuda:N.")
    if m.group(1) == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(m.group(2) or 0)
        if index >= count:
            raise InvalidRequestError(f"device {name!r} is not available here ({count} CUDA device(s)); "
                                      "use cpu, or a CUDA device this machine has.")
    return torch.device(name.strip())


def _check_limit(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidRequestError(f"{name} must be an integer >= 1 (or unset for no limit), got {value!r}.")


class Kernel(MemoryHooks):
    """One model, one KV pool (plus a host swap pool), many processes of many owners.

    Thread-safe: every public method takes the kernel lock, so a server thread may drive `step()`
    while others spawn, read or kill. Every call that names an `owner` only sees that owner's processes.
    """

    def __init__(self, model_dir: str | Path, config: KernelConfig | None = None,
                 store: HibernationStore | None = None) -> None:
        self.config = config = config or KernelConfig()
        if config.policy not in POLICIES:
            raise InvalidRequestError(f"unknown scheduling policy {config.policy!r}; use one of {', '.join(POLICIES)}.")
        _check_limit("rr_quantum", config.rr_quantum)
        _check_limit("max_processes_per_owner", config.max_processes_per_owner)
        _check_limit("max_blocks_per_owner", config.max_blocks_per_owner)
        self.model_dir = Path(model_dir)
        self.model_name = self.model_dir.name
        self.device = resolve_device(config.device)
        dtype = getattr(torch, config.dtype) if config.dtype else None
        self.model, self.model_config = load_model(model_dir, self.device, dtype)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self.context_length = self.model_config.context_length
        self.recurrent = self.model_config.is_recurrent
        # Tokens per block: a recurrent model's one state slot covers its whole context.
        self.block_size = self.context_length if self.recurrent else config.block_size
        self.pool = self._make_pool()
        self.swap_pool = self._make_swap_pool()
        self.block_manager = BlockManager(self.pool.num_blocks, self.block_size, self.swap_pool.num_blocks,
                                          enable_prefix_cache=config.enable_prefix_cache and not self.recurrent)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   policy=config.policy, rr_quantum=config.rr_quantum, memory=self)
        self.runner = ModelRunner(self.model, self.pool, self.swap_pool, self.block_manager, self.device)
        if hasattr(self.model, "warm_up"):
            self.model.warm_up(config.max_num_batched_tokens, config.max_num_seqs)
        self.processes: dict[int, Process] = {}
        self.streams: dict[int, Stream] = {}
        self._pids = itertools.count(1)
        self.owner_limits: dict[str, tuple[int | None, int | None]] = {}  # see set_owner_limits
        self._fork_counts: dict[int, int] = {}  # pid -> children forked from it so far
        self._restored: dict[int, tuple[str, str]] = {}  # pid -> (image id, owner) it was restored from
        self._hibernated_as: dict[int, tuple[str, str]] = {}  # pid -> (image id, owner) it was hibernated as
        self._ended: deque[int] = deque()
        self._changes: deque[tuple[int, int]] = deque(maxlen=65536)  # (seq, pid): output appended or process ended
        self._change_seq = 0  # pids of ended processes, oldest first (reaped past keep_finished)
        self._pending_forks: dict[int, int] = {}  # pid -> children to fork when its prompt is done (n > 1)
        self.lock = threading.RLock()
        self.steps = 0
        self.store = store
        self.prefill_s_per_token = 1e-4  # measured, see prefer_swap
        self._fingerprint: str | None = None

    def _bytes_per_block(self, dtype: torch.dtype) -> int:
        mc = self.model_config
        if self.recurrent:
            return StatePool.bytes_per_slot(mc.num_layers, mc.hidden_size, dtype)
        return KVPool.bytes_per_block(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.block_size, dtype)

    def _make_pool(self) -> KVPool | StatePool:
        c, mc = self.config, self.model_config
        if c.block_size < 1 or c.max_num_seqs < 1 or c.max_num_batched_tokens < 1:
            raise InvalidRequestError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1.")
        dtype = next(self.model.parameters()).dtype
        per_block = self._bytes_per_block(dtype)
        budget = parse_memory_budget(c.kv_memory, self.device)
        blocks_per_seq = -(-self.context_length // self.block_size)
        num_blocks = min(KVPool.num_blocks_for_budget(budget, per_block), c.max_num_seqs * blocks_per_seq)
        if num_blocks < 1:
            what = "state slot" if self.recurrent else "block"
            raise InvalidRequestError(f"KV memory budget {c.kv_memory!r} ({budget} bytes) holds no {what} of "
                                      f"{per_block} bytes; give a size such as 1GiB or a fraction of free memory "
                                      "such as 0.25 (a bare integer counts bytes).")
        if self.recurrent:
            return StatePool(mc.num_layers, mc.hidden_size, num_blocks, dtype, self.device)
        return KVPool(mc.num_layers, mc.num_kv_heads, mc.head_dim, num_blocks, c.block_size, dtype, self.device)

    def _make_swap_pool(self) -> SwapPool:
        c = self.config
        dtype = self.pool.dtype
        per_block = self._bytes_per_block(dtype)
        if _is_zero_size(c.swap_memory):
            num_blocks = 0
        else:
            budget = parse_memory_budget(c.swap_memory, "cpu")
            # More swap than could ever be filled (every seat's whole context) is wasted host memory.
            cap = c.max_num_seqs * 4 * -(-self.context_length // self.block_size)
            num_blocks = min(KVPool.num_blocks_for_budget(budget, per_block), cap)
            if num_blocks < 1:
                raise InvalidRequestError(f"swap memory {c.swap_memory!r} ({budget} bytes) holds no KV block of "
                                          f"{per_block} bytes; give at least that much (e.g. 256MiB), or 0 for no swap.")
        p = self.pool  # the same layout as the device pool (a StatePool's: one one-token block per slot)
        return SwapPool(p.num_layers, p.num_kv_heads, p.head_dim, num_blocks, p.block_size, dtype)

    # ---- helpers ---------------------------------------------------------------------------------

    def _live(self, owner: str) -> list[Process]:
        return [p for p in self.processes.values() if p.owner == owner and not p.is_finished]

    def set_owner_limits(self, owner: str, max_processes: int | None = None, max_blocks: int | None = None) -> None:
        """Per-owner limits that override KernelConfig's defaults for `owner` (None: the default)."""
        _check_limit("max_processes", max_processes)
        _check_limit("max_blocks", max_blocks)
        with self.lock:
            self.owner_limits[owner] = (max_processes, max_blocks)

    def _limits(self, owner: str) -> tuple[int | None, int | None]:
        procs, blocks = self.owner_limits.get(owner, (None, None))
        return (procs if procs is not None else self.config.max_processes_per_owner,
                blocks if blocks is not None else self.config.max_blocks_per_owner)

    def _check_process_quota(self, owner: str, new: int) -> None:
        limit = self._limits(owner)[0]
        if limit is not None and len(self._live(owner)) + new > limit:
            raise QuotaExceededError(f"owner {owner!r} already has {len(self._live(owner))} live processes and the "
                                     f"limit is {limit}; wait for one to finish or kill one (`llmos kill PID`).")

    def owner_blocks(self, owner: str) -> int:
        """Device KV blocks the owner's processes hold (a block shared by two of them counts twice)."""
        bm = self.block_manager
        return sum(bm.num_resident_blocks(p.pid) for p in self._live(owner))

    def may_admit(self, p: Process, num_tokens: int) -> bool:
        """Scheduler hook: may `p` hold blocks for `num_tokens` tokens under its owner's block limit?"""
        limit = self._limits(p.owner)[1]
        if limit is None:
            return True
        bm = self.block_manager
        extra = max(0, bm.blocks_needed(num_tokens) - bm.num_resident_blocks(p.pid))
        return self.owner_blocks(p.owner) + extra <= limit

    def cache_salt(self, p: Process) -> str:
        """Prefix-cache salt: blocks are shared only between processes of the same owner."""
        return p.owner

    def prefer_swap(self, p: Process) -> bool:
        """The cost rule of the module docstring: is swapping p's blocks out and back cheaper than recomputing?"""
        bm = self.block_manager
        n = bm.num_resident_blocks(p.pid)
        if n == 0 or p.num_computed_tokens == 0:
            return False
        per_block = self.pool.nbytes // max(1, self.pool.num_blocks)
        swap_s = 2 * n * per_block / self.runner.swap_bytes_per_s
        return swap_s < p.num_computed_tokens * self.prefill_s_per_token

    def _apply_ops(self) -> None:
        """Replay the block manager's pending copies/swaps now (for calls made between steps)."""
        self.runner.apply_ops()

    @property
    def fingerprint(self) -> str:
        """Identifies the model (architecture, dtype and weights) a hibernation image needs."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model_config.to_dict(), self.pool.dtype,
                                                  weights_hash=weights_fingerprint(self.model))
        return self._fingerprint

    def _store(self) -> HibernationStore:
        if self.store is None:
            self.store = HibernationStore(Path(self.config.hibernate_dir)) if self.config.hibernate_dir \
                else default_store()
        return self.store

    # ---- system calls (see syscalls.py for the public wrappers) ------------------------------

    def spawn(self, prompt: str | list[int], params: SamplingParams | None = None, owner: str = "local",
              nice: int = 0, n: int = 1) -> Process:
        """Create a process for `prompt` (text, or token ids) and queue it. Returns it in state READY.

        `nice` (-20..19, lower runs first under the priority policy). `n` > 1: parallel sampling; the prompt is
        computed once and, when it is done, forked into n - 1 more processes that share its KV blocks
        (copy-on-write), each sampling its own continuation (their pids are in `children(pid)`).
        Raises `InvalidRequestError` (empty prompt, prompt at or over the context window, bad sampling
        parameters, bad nice or n), `OutOfBlocksError` (the process could never fit in the KV pool) or
        `QuotaExceededError` (the owner is at a limit).
        """
        params = (params or SamplingParams()).validate()
        _check_nice(nice)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
            raise InvalidRequestError(f"n must be an integer from 1 to 64 (parallel samples), got {n!r}.")
        _check_owner(owner)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty; give some text to continue.")
            _check_utf8(prompt, "the prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.model_config.vocab_size}).")
        if not ids:
            raise InvalidRequestError("the prompt is empty after tokenization; give some text to continue.")
        if len(ids) >= self.context_length:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but {self.model_name} has a context window of "
                f"{self.context_length} tokens; shorten the prompt to at most {self.context_length - 1} tokens.")
        with self.lock:
            self._check_process_quota(owner, n)
            need = self.block_manager.blocks_needed(min(len(ids) + params.max_tokens, self.context_length))
            if need > self.block_manager.num_blocks:
                raise OutOfBlocksError(
                    f"this request needs up to {need} KV blocks but the pool has {self.block_manager.num_blocks}; "
                    "lower max_tokens or the prompt length, or give the kernel more KV memory (--kv-memory).")
            limit = self._limits(owner)[1]
            if limit is not None and need > limit:
                raise QuotaExceededError(f"this request needs up to {need} KV blocks but owner {owner!r} may hold "
                                         f"at most {limit}; lower max_tokens or the prompt length.")
            p = Process(pid=next(self._pids), owner=owner, model=self.model_name, prompt_token_ids=ids,
                        params=params, priority=nice)
            self.processes[p.pid] = p
            self.streams[p.pid] = Stream(IncrementalDetokenizer(self.tokenizer, ids))
            if n > 1:
                self._pending_forks[p.pid] = n - 1
            proc.admit(p)
            self.scheduler.add(p)
            return p

    def get(self, pid: int, owner: str | None = None) -> Process:
        """The process `pid`; with `owner`, only if it is theirs. Raises `ProcessNotFoundError`."""
        p = self.processes.get(pid)
        if p is None or (owner is not None and p.owner != owner):
            raise ProcessNotFoundError(f"no process with pid {pid} of yours; `ps` lists your processes.")
        return p

    def children(self, pid: int) -> list[int]:
        return [c.pid for c in self.processes.values() if c.parent == pid]

    def kill(self, pid: int, owner: str | None = None) -> Process:
        """Kill a live process and free its blocks (device and swap) at once. Killing a process hibernated here
        deletes its image (it can no longer be restored) and makes it KILLED; killing a finished or killed process
        is a no-op. Raises `ProcessNotFoundError`, or `InvalidRequestError` for a hibernated process whose image
        runs again here as another process (kill that one)."""
        with self.lock:
            p = self.get(pid, owner)
            if p.state is ProcState.HIBERNATED:
                self._kill_hibernated(p)
            elif not p.is_finished:
                proc.kill(p)
                self._retire(p)
            return p

    def _kill_hibernated(self, p: Process) -> None:
        image = self._hibernated_as.get(p.pid)
        running = next((q for q, restored in self._restored.items() if restored == image), None)
        if running is not None:
            raise InvalidRequestError(f"process {p.pid} was hibernated as {image[0]}, which runs again as pid "
                                      f"{running}; kill pid {running} instead.")
        if image is not None:
            try:
                self._store().remove(*image)
            except (HibernationError, OSError):  # restored elsewhere and ended, or deleted: gone already
                pass
        self._hibernated_as.pop(p.pid, None)
        proc.kill(p)

    def nice(self, pid: int, level: int, owner: str | None = None) -> Process:
        """Set a live process's nice level (-20..19; lower runs first under the priority policy)."""
        _check_nice(level)
        with self.lock:
            p = self._live_process(pid, owner, "renice")
            self.scheduler.renice(p, level)
            return p

    def fork(self, pid: int, n: int = 1, owner: str | None = None) -> list[Process]:
        """Make `n` children of a live process that continue from where it is now, each with its own sampling
        stream: they share all of its KV blocks (reference counts) and copy a block only when they first
        write into a shared partial one (copy-on-write). A child's output so far equals the parent's.

        A seeded parent's k-th child gets a seed derived from the parent's seed and k (reproducible);
        an unseeded parent's children draw fresh randomness. Raises `ProcessNotFoundError`,
        `InvalidRequestError` (n < 1, parent not READY or RUNNING) or `QuotaExceededError`.
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
            raise InvalidRequestError(f"fork needs n from 1 to 64 children, got {n!r}.")
        with self.lock:
            p = self._live_process(pid, owner, "fork")
            if p.state not in (ProcState.READY, ProcState.RUNNING):
                raise InvalidRequestError(f"process {pid} is {p.state.name.lower()}; resume it before forking it.")
            self._check_process_quota(p.owner, n)
            return [self._fork_one(p) for _ in range(n)]

    def _fork_one(self, p: Process) -> Process:
        bm = self.block_manager
        # The k-th child of a seeded parent (k counts every fork of it) gets a seed from the parent's seed and k
        # alone, so the same request with the same seed gives the same n samples whatever its pid.
        k = self._fork_counts.get(p.pid, 0)
        self._fork_counts[p.pid] = k + 1
        seed = None if p.params.seed is None else (p.params.seed * 1_000_003 + k + 1) % 2**63
        c = Process(pid=next(self._pids), owner=p.owner, model=p.model, prompt_token_ids=p.prompt_token_ids,
                    params=replace(p.params, seed=seed), priority=p.priority, parent=p.pid,
                    output_token_ids=list(p.output_token_ids))
        c.first_token_time = p.first_token_time
        if bm.num_resident_blocks(p.pid) and not bm.is_swapped(p.pid):
            bm.fork(p.pid, c.pid)
            c.num_computed_tokens = p.num_computed_tokens
        s = self.streams[p.pid]
        self.processes[c.pid] = c
        self.streams[c.pid] = Stream(s.detokenizer.clone(), released=s.released, text=s.text,
                                     token_times=list(s.token_times), logprobs=list(s.logprobs))
        proc.admit(c)
        if p.state is ProcState.RUNNING and c.num_computed_tokens:
            self.scheduler.add_running(c)  # it holds its blocks already: it runs next step, beside its parent
        else:
            self.scheduler.add(c, front=True)
        return c

    def suspend(self, pid: int, owner: str | None = None) -> Process:
        """Stop scheduling a READY or RUNNING process: its KV blocks move to the host swap pool when they fit
        there (else they are dropped and recomputed on resume) and its device blocks are free at once."""
        with self.lock:
            p = self._live_process(pid, owner, "suspend")
            if p.state not in (ProcState.READY, ProcState.RUNNING):
                raise InvalidRequestError(f"process {pid} is {p.state.name.lower()}; only a ready or running "
                                          "process can be suspended.")
            self.scheduler.dequeue(p)
            keep = self._swap_out_or_drop(p)
            proc.suspend(p, keep_computed=keep)
            return p

    def _swap_out_or_drop(self, p: Process) -> bool:
        """Free p's device blocks, keeping the K/V in swap when they fit. True if kept (swapped or already swapped)."""
        bm = self.block_manager
        if bm.is_swapped(p.pid):
            return True
        if p.num_computed_tokens and bm.can_swap_out(p.pid):
            bm.swap_out(p.pid)
            self._apply_ops()
            return True
        bm.free(p.pid)
        return False

    def resume(self, pid: int, owner: str | None = None) -> Process:
        """Queue a SUSPENDED process again (its K/V come back from swap when it is next admitted)."""
        with self.lock:
            p = self._live_process(pid, owner, "resume")
            if p.state is not ProcState.SUSPENDED:
                raise InvalidRequestError(f"process {pid} is {p.state.name.lower()}, not suspended; nothing to resume.")
            proc.resume(p)
            self.scheduler.add(p)
            return p

    def hibernate(self, pid: int, owner: str | None = None) -> str:
        """Write a live process (tokens, sampling state and RNG, K/V of its computed tokens) to disk under
        LLMOS_HOME atomically, then end it here (state HIBERNATED, blocks freed). Returns the image id that
        `restore` takes, in this kernel or a later one. Raises `HibernationError` when the image cannot be written
        (then the process is left as it was)."""
        with self.lock:
            p = self._live_process(pid, owner, "hibernate")
            if p.state is ProcState.NEW:
                raise InvalidRequestError(f"process {pid} is not admitted yet; try again.")
            image = self._image(p)
            self._store().save(image)
            proc.hibernate(p)
            self._hibernated_as[p.pid] = (image.hid, p.owner)
            self._retire(p)
            return image.hid

    def _image(self, p: Process) -> HibernationImage:
        bm, s = self.block_manager, self.streams[p.pid]
        kv = state = None
        if p.num_computed_tokens:
            n = bm.blocks_needed(p.num_computed_tokens)
            if bm.is_swapped(p.pid):
                blocks = self.swap_pool.read_blocks(bm.swap_tables[p.pid][:n])
            else:
                blocks = self.pool.read_blocks(bm.block_table(p.pid)[:n])
            if self.recurrent:  # one slot: [num_layers, 2, 1, 1, 1, hidden] -> [num_layers, 2, hidden]
                state = blocks.reshape(self.pool.num_layers, 2, self.pool.head_dim)
            else:
                kv = blocks
        extra = {"pending_forks": self._pending_forks[p.pid]} if p.pid in self._pending_forks else None
        return HibernationImage.from_process(p, model_fingerprint=self.fingerprint, block_size=bm.block_size, kv=kv,
                                             state=state, generator=self.runner.generators.get(p.pid),
                                             text=s.text[:s.released], extra=extra)

    def restore(self, hid: str, owner: str = "local") -> Process:
        """Bring back a hibernated process as a new READY process (new pid) with the same tokens, sampling
        state and K/V. Its K/V go back into the pool when there is room, else it recomputes them. The image
        stays on disk until the restored process ends (finishes, is killed, or is hibernated again under a new
        id), so an interrupted resume loses nothing. Raises `HibernationError` (no such image for this owner,
        corrupt or inconsistent file, another model's image, already restored here), `OutOfBlocksError` (it
        could never fit this pool) or `QuotaExceededError`."""
        _check_owner(owner)
        with self.lock:
            self._check_process_quota(owner, 1)
            if (hid, owner) in self._restored.values():
                raise HibernationError(f"hibernated process {hid} is already running here (restored as pid "
                                       f"{next(k for k, v in self._restored.items() if v == (hid, owner))}).")
            image = self._store().load(hid, owner, expected_fingerprint=self.fingerprint)
            vocab, tokens = self.model_config.vocab_size, image.prompt_token_ids + image.output_token_ids
            if not image.prompt_token_ids or any(not 0 <= t < vocab for t in tokens) \
                    or len(tokens) >= self.context_length:
                raise HibernationError(f"hibernated process {hid} holds tokens this model cannot continue "
                                       f"(ids outside [0, {vocab}) or {len(tokens)} tokens for a context of "
                                       f"{self.context_length}); the file was altered.")
            left = max(0, image.sampling_params().max_tokens - len(image.output_token_ids))
            need = self.block_manager.blocks_needed(min(len(tokens) + left, self.context_length))
            if need > self.block_manager.num_blocks:
                raise OutOfBlocksError(
                    f"hibernated process {hid} needs up to {need} KV blocks but the pool has "
                    f"{self.block_manager.num_blocks}; give the kernel more KV memory (--kv-memory).")
            generator = image.restore_generator(self.device)
            p = image.to_process(next(self._pids))
            p.model, p.num_computed_tokens = self.model_name, 0
            p.output_tokens_at_start = p.num_output_tokens
            forks = image.extra.get("pending_forks")
            if isinstance(forks, int) and 0 < forks < 64 and not p.output_token_ids:
                self._pending_forks[p.pid] = forks
            bm = self.block_manager
            held = image.state if self.recurrent else image.kv
            if held is not None and bm.can_allocate(p.pid, image.num_computed_tokens):
                table = bm.allocate(p.pid, image.num_computed_tokens)
                self._apply_ops()  # pending moves read their blocks before this one is written
                try:
                    if self.recurrent:
                        scatter_state(image, self.pool, table[0])
                    else:
                        scatter_kv(image, self.pool.kv_caches, table)
                except HibernationError:
                    bm.free(p.pid)
                    raise
                p.num_computed_tokens = image.num_computed_tokens
            if generator is not None:
                self.runner.generators[p.pid] = generator
            detok = IncrementalDetokenizer(self.tokenizer, p.prompt_token_ids)
            for t in p.output_token_ids:
                detok.step(t)
            self.processes[p.pid] = p
            self.streams[p.pid] = Stream(detok, released=len(image.text), text=detok.text,
                                         released_at_start=len(image.text))
            proc.admit(p)
            self.scheduler.add(p)
            self._restored[p.pid] = (hid, owner)
            return p

    def hibernated(self, owner: str = "local") -> list[dict]:
        """The owner's hibernated processes on disk (newest last)."""
        _check_owner(owner)
        return self._store().list(owner)

    def warm_prefix(self, token_ids: list[int], kv: torch.Tensor, owner: str = "local") -> int:
        """Put K/V computed earlier for `token_ids` (e.g. a chat session saved to disk before a restart) into
        the prefix cache under `owner`'s salt, so that a later prompt of `owner` starting with these tokens hits
        them instead of computing them.

        `kv`: [num_layers, 2, num_blocks, kv_block_size, num_kv_heads, head_dim] (HibernationImage.kv's layout;
        any block size), the K/V of the leading tokens of `token_ids` in order. Only full blocks of this pool are
        cached: blocks are allocated, written, committed under their chain hashes and freed, so they sit in the
        cache (reclaimable like any cached block). Blocks already cached are reused, not rewritten; the prefix
        cache's query and hit counters are left as they were (warming is not a lookup).
        Returns the leading full blocks of `token_ids` now cached (0 with the prefix cache off, for a recurrent
        model, or when the pool has no room for them). Raises ValueError when `kv`'s layers, heads or head_dim
        are not this pool's.
        """
        if self.recurrent:
            return 0  # no prefix cache for state slots
        layers, _, blocks, kv_block_size, heads, head_dim = kv.shape
        pool, bm = self.pool, self.block_manager
        if (layers, heads, head_dim) != (pool.num_layers, pool.num_kv_heads, pool.head_dim):
            raise ValueError(f"warm_prefix: K/V for {layers} layers x {heads} heads x {head_dim}, but the pool holds "
                             f"{pool.num_layers} x {pool.num_kv_heads} x {pool.head_dim}")
        with self.lock:
            bs = bm.block_size
            n = min(blocks * kv_block_size, len(token_ids)) // bs
            if not bm.enable_prefix_cache or n == 0:
                return 0
            ids, pid = list(token_ids[:n * bs]), -1  # a pseudo pid: no process has a negative one
            counters = bm.prefix_queries, bm.prefix_hits
            hit = bm.allocate_prefix(pid, ids, n * bs, salt=owner)  # owner: the salt cache_salt gives its processes
            bm.prefix_queries, bm.prefix_hits = counters
            if hit is None:
                return 0
            try:
                first = hit // bs
                self._apply_ops()  # pending moves read their blocks before these are written
                tokens = kv.reshape(layers, 2, blocks * kv_block_size, heads, head_dim)[:, :, first * bs:n * bs]
                tokens = tokens.reshape(layers, 2, n - first, bs, heads, head_dim)
                pool.write_blocks(bm.block_table(pid)[first:n], tokens)
                bm.commit(pid, ids, n * bs, salt=owner)
            finally:
                bm.free(pid)
            return n

    def _live_process(self, pid: int, owner: str | None, what: str) -> Process:
        p = self.get(pid, owner)
        if p.is_finished:
            raise InvalidRequestError(f"process {pid} has ended ({p.state.name.lower()}); cannot {what} it.")
        return p

    def read(self, pid: int) -> list[str]:
        """Take the text deltas produced so far (may be empty)."""
        with self.lock:
            s = self.streams[pid]
            out = list(s.deltas)
            s.deltas.clear()
            return out

    # ---- the loop ------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> int:
        """Run one batch. Returns the number of tokens computed (0 when idle)."""
        with self.lock:
            batch = self.scheduler.schedule()
            if not batch.items:
                self._apply_ops()  # swaps decided by preemption alone
                return 0
            t0 = time.perf_counter()
            sampled = self.runner.execute(batch)
            prefill = sum(n for p, n in batch.items if n > 1)
            if prefill >= 64:
                dt = time.perf_counter() - t0
                self.prefill_s_per_token = 0.7 * self.prefill_s_per_token + 0.3 * dt / batch.num_tokens
            bm = self.block_manager
            for p, n in batch.items:
                p.num_computed_tokens += n
                bm.commit(p.pid, p.token_ids, p.num_computed_tokens, self.cache_salt(p))
            now = time.monotonic()
            for i, (p, token) in enumerate(sampled):
                forks = self._pending_forks.pop(p.pid, 0)
                if forks:
                    self._fork_at_first_token(p, forks, i, now)
                self._append(p, token, now)
            self.steps += 1
            return batch.num_tokens

    def _fork_at_first_token(self, p: Process, forks: int, row: int, now: float) -> None:
        """Parallel sampling: p's prompt is computed; fork it before its first token and give each child
        its own first token, drawn from the same logits with the child's own generator."""
        children = [self._fork_one(p) for _ in range(forks)]
        tokens = self.runner.resample(row, children)
        for c, token in zip(children, tokens):
            self._append(c, token, now)

    def run_until_done(self, pids: list[int] | None = None) -> None:
        """Step until the given processes (default: all) have finished."""
        while True:
            with self.lock:
                live = [self.processes[i] for i in pids] if pids is not None else list(self.processes.values())
                if all(p.is_finished or p.state is ProcState.SUSPENDED for p in live) or not self.has_work():
                    return
                self.step()

    def _changed(self, pid: int) -> None:
        self._change_seq += 1
        self._changes.append((self._change_seq, pid))

    def changes_since(self, seq: int) -> tuple[int, set[int]]:
        """Pids that got output tokens or ended after change number `seq`, and the latest change number: how an
        observer (e.g. metrics) visits only what changed instead of the whole process table. Pass 0 first."""
        with self.lock:
            pids: set[int] = set()
            for n, pid in reversed(self._changes):  # newest first: stop at the first one already seen
                if n <= seq:
                    break
                pids.add(pid)
            return self._change_seq, pids

    def _append(self, p: Process, token: int, now: float) -> None:
        proc.append_token(p, token)
        self._changed(p.pid)
        s = self.streams[p.pid]
        s.token_times.append(now)
        if p.params.logprobs is not None:
            s.logprobs.append(self.runner.last_logprobs.get(p.pid, (float("nan"), [])))
        params = p.params
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return self._finish(p, "stop")
        s.detokenizer.step(token)
        text = s.detokenizer.text
        if params.stop:
            cut = find_stop(text, params.stop, s.released)
            if cut != -1:
                return self._finish(p, "stop", text=text[:cut])
            hold = max(len(x) for x in params.stop) - 1  # a stop string may still be forming
            self._release(s, text, len(text) - hold)
        else:
            self._release(s, text, len(text))
        if p.num_output_tokens >= params.max_tokens or p.num_tokens >= self.context_length:
            self._finish(p, "length")

    def _release(self, s: Stream, text: str, upto: int) -> None:
        if upto > s.released:
            s.deltas.append(text[s.released:upto])
            s.released = upto
        s.text = text

    def _finish(self, p: Process, reason: str, text: str | None = None) -> None:
        s = self.streams[p.pid]
        if text is None:
            s.detokenizer.finish()
            text = s.detokenizer.text
        self._release(s, text, len(text))
        s.text = text
        proc.finish(p, reason)
        self._retire(p)

    def _retire(self, p: Process) -> None:
        self.scheduler.remove(p)
        self.runner.release(p.pid)
        self._pending_forks.pop(p.pid, None)
        self._fork_counts.pop(p.pid, None)
        restored = self._restored.pop(p.pid, None)
        if restored is not None:  # it ended here: the image it came from is done with
            try:
                self._store().remove(*restored)
            except (HibernationError, OSError):
                pass
        self._ended.append(p.pid)
        self._changed(p.pid)
        while len(self._ended) > max(0, self.config.keep_finished):  # reap the oldest ended processes
            old = self._ended.popleft()
            self.processes.pop(old, None)
            self.streams.pop(old, None)
            self._hibernated_as.pop(old, None)

    # ---- observability -------------------------------------------------------------------------

    def ps(self, owner: str | None = None, all: bool = False) -> list[dict]:
        """One row per process (live ones only unless `all`): what `llmos ps` and `top` show.

        Blocks: `resident_blocks` in the device pool (shared blocks count for each holder), `swapped_blocks`
        in host swap; `kv_bytes` = both, in bytes."""
        with self.lock:
            now = time.monotonic()
            bm = self.block_manager
            per_block = self.pool.nbytes // max(1, self.pool.num_blocks)
            rows = []
            for p in self.processes.values():
                if (owner is not None and p.owner != owner) or (p.is_finished and not all):
                    continue
                s = self.streams[p.pid]
                new = p.num_output_tokens - p.output_tokens_at_start  # tokens generated by this kernel
                elapsed = (p.finish_time or now) - (p.first_token_time or now)
                rate = (new - 1) / elapsed if elapsed > 0 and new > 1 else 0.0
                resident, swapped = bm.num_resident_blocks(p.pid), bm.num_swapped_blocks(p.pid)
                rows.append({
                    "pid": p.pid, "owner": p.owner, "model": p.model, "state": p.state.name, "nice": p.priority,
                    "parent": p.parent, "prompt_tokens": p.num_prompt_tokens, "output_tokens": p.num_output_tokens,
                    "resident_blocks": resident, "swapped_blocks": swapped,
                    "kv_bytes": (resident + swapped) * per_block,
                    "tokens_per_s": round(rate, 2), "age_s": round(now - p.arrival_time, 2),
                    "preemptions": p.num_preemptions, "finish_reason": p.finish_reason, "text": s.text,
                })
            return rows

    def memory(self, owner: str | None = None) -> dict:
        """KV pool and swap usage in blocks and bytes, prefix-cache counters, and per-owner use
        (only `owner`'s when given)."""
        with self.lock:
            bm = self.block_manager
            per_block = self.pool.nbytes // max(1, self.pool.num_blocks)
            owners: dict[str, dict] = {}
            for p in self.processes.values():
                if p.is_finished or (owner is not None and p.owner != owner):
                    continue
                o = owners.setdefault(p.owner, {"processes": 0, "resident_blocks": 0, "swapped_blocks": 0})
                o["processes"] += 1
                o["resident_blocks"] += bm.num_resident_blocks(p.pid)
                o["swapped_blocks"] += bm.num_swapped_blocks(p.pid)
            stats = bm.stats()
            out = {"num_blocks": bm.num_blocks, "used_blocks": bm.num_used_blocks, "free_blocks": bm.num_free_blocks,
                   "cached_blocks": bm.num_cached_blocks, "block_size": bm.block_size, "bytes_per_block": per_block,
                   "pool_bytes": self.pool.nbytes, "swap_blocks": bm.num_swap_blocks,
                   "free_swap_blocks": bm.num_free_swap_blocks, "swap_bytes": self.swap_pool.nbytes,
                   "prefix_cache": {k: stats[k] for k in ("prefix_queries", "prefix_hits", "hit_rate", "evictions")},
                   "policy": self.config.policy, "owners": owners}
            if self.config.policy == "fair":
                out["counters"] = {o: c for o, c in self.scheduler.counters.items() if owner is None or o == owner}
            return out


def _check_nice(level) -> None:
    if isinstance(level, bool) or not isinstance(level, int) or not -20 <= level <= 19:
        raise InvalidRequestError(f"nice level must be an integer from -20 (most favoured) to 19 (least), got {level!r}.")


def _check_utf8(text: str, what: str) -> None:
    """Refuse text that cannot be UTF-8 (lone surrogates, e.g. undecodable bytes on a command line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{what} is not valid UTF-8 text; give it in UTF-8.") from None


def _check_owner(owner) -> None:
    if not isinstance(owner, str) or not owner:
        raise InvalidRequestError(f"the owner must be a non-empty name, got {owner!r}.")
    _check_utf8(owner, "the owner name")


def _is_zero_size(value) -> bool:
    """0, "0", "0B", "0KiB", "0.0", "00": no memory at all."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, str):
        return re.fullmatch(r"\s*0*\.?0*\s*([kmgt]i?)?b?\s*", value.lower()) is not None and "0" in value
    return False
