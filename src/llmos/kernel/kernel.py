"""The kernel loop: admit -> schedule -> run -> sample -> stream -> retire.

Owns the process table, the model, the KV pool and every process's output stream. Each `step()`
runs one batch; a finished or killed process gives back its blocks in the same step.
Never parses user-facing input formats (that is the front ends' job) and never sleeps.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmos.errors import InvalidRequestError, OutOfBlocksError, ProcessNotFoundError
from llmos.kernel import proc
from llmos.kernel.kvcache import BlockManager, KVPool, parse_memory_budget
from llmos.kernel.proc import Process, ProcState
from llmos.kernel.runner import ModelRunner
from llmos.kernel.sched import Scheduler
from llmos.model.loader import load_model
from llmos.model.sampling import SamplingParams, find_stop
from llmos.model.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class KernelConfig:
    """Kernel settings, validated once at the edge.

    `kv_memory`: KV pool budget: bytes, a size string ("2GiB") or a fraction of free memory (0.3).
    `block_size`: tokens per KV block. `max_num_seqs`: running processes at most.
    `max_num_batched_tokens`: the per-step token budget (prefill chunks + decodes).
    """

    kv_memory: str | int | float = "0.25"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    device: str | None = None
    dtype: str | None = None


@dataclass
class Stream:
    """One process's output: text deltas waiting to be read, and per-token times (seconds, monotonic)."""

    detokenizer: IncrementalDetokenizer
    held: int = 0  # characters of detokenizer text not yet released (a stop string may be forming)
    released: int = 0  # characters of output text released to readers
    text: str = ""
    deltas: deque[str] = field(default_factory=deque)
    token_times: list[float] = field(default_factory=list)


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


class Kernel:
    """One model, one KV pool, many processes.

    Thread-safe: every public method takes the kernel lock, so a server thread may drive `step()`
    while others spawn, read or kill.
    """

    def __init__(self, model_dir: str | Path, config: KernelConfig | None = None) -> None:
        self.config = config = config or KernelConfig()
        self.model_dir = Path(model_dir)
        self.model_name = self.model_dir.name
        self.device = resolve_device(config.device)
        dtype = getattr(torch, config.dtype) if config.dtype else None
        self.model, self.model_config = load_model(model_dir, self.device, dtype)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self.context_length = self.model_config.context_length
        self.pool = self._make_pool()
        self.block_manager = BlockManager(self.pool.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.pool, self.block_manager, self.device)
        self.processes: dict[int, Process] = {}
        self.streams: dict[int, Stream] = {}
        self._pids = itertools.count(1)
        self.lock = threading.RLock()
        self.steps = 0

    def _make_pool(self) -> KVPool:
        c, mc = self.config, self.model_config
        if c.block_size < 1 or c.max_num_seqs < 1 or c.max_num_batched_tokens < 1:
            raise InvalidRequestError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1.")
        dtype = next(self.model.parameters()).dtype
        per_block = KVPool.bytes_per_block(mc.num_layers, mc.num_kv_heads, mc.head_dim, c.block_size, dtype)
        budget = parse_memory_budget(c.kv_memory, self.device)
        blocks_per_seq = -(-self.context_length // c.block_size)
        num_blocks = min(KVPool.num_blocks_for_budget(budget, per_block), c.max_num_seqs * blocks_per_seq)
        if num_blocks < 1:
            raise InvalidRequestError(f"KV memory budget {c.kv_memory!r} ({budget} bytes) holds no block of "
                                      f"{per_block} bytes; give a size such as 1GiB or a fraction of free memory "
                                      "such as 0.25 (a bare integer counts bytes).")
        return KVPool(mc.num_layers, mc.num_kv_heads, mc.head_dim, num_blocks, c.block_size, dtype, self.device)

    # ---- system calls (see syscalls.py for the public wrappers) ------------------------------

    def spawn(self, prompt: str | list[int], params: SamplingParams | None = None, owner: str = "local") -> Process:
        """Create a process for `prompt` (text, or token ids) and queue it. Returns it in state READY.

        Raises `InvalidRequestError` (empty prompt, prompt at or over the context window, bad sampling
        parameters) or `OutOfBlocksError` (the process could never fit in the KV pool).
        """
        params = (params or SamplingParams()).validate()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty; give some text to continue.")
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
            p = Process(pid=next(self._pids), owner=owner, model=self.model_name, prompt_token_ids=ids, params=params)
            need = self.block_manager.blocks_needed(min(len(ids) + params.max_tokens, self.context_length))
            if need > self.block_manager.num_blocks:
                raise OutOfBlocksError(
                    f"this request needs up to {need} KV blocks but the pool has {self.block_manager.num_blocks}; "
                    "lower max_tokens or the prompt length, or give the kernel more KV memory (--kv-memory).")
            self.processes[p.pid] = p
            self.streams[p.pid] = Stream(IncrementalDetokenizer(self.tokenizer, ids))
            proc.admit(p)
            self.scheduler.add(p)
            return p

    def get(self, pid: int, owner: str | None = None) -> Process:
        """The process `pid`; with `owner`, only if it is theirs. Raises `ProcessNotFoundError`."""
        p = self.processes.get(pid)
        if p is None or (owner is not None and p.owner != owner):
            raise ProcessNotFoundError(f"no process with pid {pid}; `llmos ps` lists the live ones.")
        return p

    def kill(self, pid: int, owner: str | None = None) -> Process:
        """Kill a live process and free its blocks at once. Killing a finished process is a no-op."""
        with self.lock:
            p = self.get(pid, owner)
            if not p.is_finished:
                proc.kill(p)
                self._retire(p)
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
                return 0
            sampled = self.runner.execute(batch)
            for p, n in batch.items:
                p.num_computed_tokens += n
            now = time.monotonic()
            for p, token in sampled:
                self._append(p, token, now)
            self.steps += 1
            return batch.num_tokens

    def run_until_done(self, pids: list[int] | None = None) -> None:
        """Step until the given processes (default: all) have finished."""
        while True:
            with self.lock:
                live = [self.processes[i] for i in pids] if pids is not None else list(self.processes.values())
                if all(p.is_finished for p in live) or not self.has_work():
                    return
                self.step()

    def _append(self, p: Process, token: int, now: float) -> None:
        proc.append_token(p, token)
        s = self.streams[p.pid]
        s.token_times.append(now)
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

    # ---- observability -------------------------------------------------------------------------

    def ps(self, owner: str | None = None, all: bool = False) -> list[dict]:
        """One row per process (live ones only unless `all`): what `llmos ps` shows."""
        with self.lock:
            now = time.monotonic()
            rows = []
            for p in self.processes.values():
                if (owner is not None and p.owner != owner) or (p.is_finished and not all):
                    continue
                s = self.streams[p.pid]
                elapsed = (p.finish_time or now) - (p.first_token_time or now)
                rate = (p.num_output_tokens - 1) / elapsed if elapsed > 0 and p.num_output_tokens > 1 else 0.0
                rows.append({
                    "pid": p.pid, "owner": p.owner, "model": p.model, "state": p.state.name,
                    "prompt_tokens": p.num_prompt_tokens, "output_tokens": p.num_output_tokens,
                    "blocks": len(self.block_manager.block_table(p.pid)) if p.state is ProcState.RUNNING else 0,
                    "tokens_per_s": round(rate, 2), "age_s": round(now - p.arrival_time, 2),
                    "finish_reason": p.finish_reason, "text": s.text,
                })
            return rows

    def memory(self) -> dict:
        """KV pool usage in blocks and bytes."""
        bm = self.block_manager
        per_block = self.pool.nbytes // max(1, self.pool.num_blocks)
        return {"num_blocks": bm.num_blocks, "used_blocks": bm.num_used_blocks, "free_blocks": bm.num_free_blocks,
                "block_size": bm.block_size, "bytes_per_block": per_block, "pool_bytes": self.pool.nbytes}
