"""The model runner: turns one scheduled batch into tensors, runs the model on the paged cache (or, for a
recurrent model, on its state slots), samples.

Owns the batch layout (token ids, positions, slot mapping, block tables; state segments for a recurrent
model), the per-process RNGs, and the replay of the block manager's copy/swap log onto the KV (or state)
and swap pools before every forward pass. Never decides who runs (sched.py) or changes process state
(kernel.py).
"""

from __future__ import annotations

import time

import torch

from llmos.kernel.kvcache import BlockManager, KVPool, StatePool, SwapPool, apply_block_ops
from llmos.kernel.proc import Process
from llmos.kernel.sched import ScheduledBatch
from llmos.model.attention import AttentionMetadata, Segment
from llmos.model.lstm import LSTMForCausalLM, StateSegment
from llmos.model.sampling import Sampler, logprob_entry, make_generator
from llmos.model.transformer import CausalLM


class ModelRunner:
    """Runs a `CausalLM` over a `KVPool`, or a recurrent model (`LSTMForCausalLM`) over a `StatePool`: each
    process's state lives in the slot its one-block table names (see kvcache.py, "State slots").

    `execute(batch)` computes `n` new tokens for every `(process, n)` item and returns
    `[(process, token_id)]` for the items that completed their uncomputed tokens (decodes and
    last prefill chunks); a partial prefill chunk samples nothing. The logits of the last step's
    sampling rows stay available to `resample` (parallel sampling forks at the first token).
    """

    def __init__(self, model: CausalLM | LSTMForCausalLM, pool: KVPool | StatePool, swap_pool: SwapPool | None,
                 block_manager: BlockManager, device: torch.device) -> None:
        self.model, self.pool, self.swap_pool, self.block_manager, self.device = model, pool, swap_pool, block_manager, device
        self.recurrent = getattr(model, "is_recurrent", False)
        if self.recurrent != isinstance(pool, StatePool):
            raise ValueError("a recurrent model runs on a StatePool, a transformer on a KVPool")
        self.block_size = pool.block_size
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator | None] = {}
        self.swap_bytes_per_s = 4e9  # host copy bandwidth of swaps, measured (EMA) as they happen
        self._last_logits: torch.Tensor | None = None
        self.last_logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = {}  # pid -> logprob_entry, last step

    def generator(self, p: Process) -> torch.Generator | None:
        """The process's own RNG, seeded from its params (created on first use, kept across preemption)."""
        if p.pid not in self.generators:
            self.generators[p.pid] = make_generator(p.params.seed, self.device)
        return self.generators[p.pid]

    def release(self, pid: int) -> None:
        self.generators.pop(pid, None)

    def apply_ops(self) -> None:
        """Replay the block manager's pending copy / swap-out / swap-in log, in order (see BlockManager.take_ops)."""
        ops = self.block_manager.take_ops()
        if not ops:
            return
        t0 = time.perf_counter()
        apply_block_ops(ops, self.pool, self.swap_pool)
        dt = time.perf_counter() - t0
        swapped = sum(len(pairs) for kind, pairs in ops if kind != "copy")
        if swapped and dt > 0:
            per_block = self.pool.nbytes // max(1, self.pool.num_blocks)
            self.swap_bytes_per_s = 0.5 * self.swap_bytes_per_s + 0.5 * swapped * per_block / dt
    def prepare(self, batch: ScheduledBatch):
        """Flatten the batch: `ids`/`positions`/`slots` `[N]`, one attention segment per process, and the
        row of the last token of each item that samples this step."""
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        segments, sample_rows, sampling = [], [], []
        for p, n in batch.items:
            start, row = p.num_computed_tokens, len(ids)
            table = self.block_manager.block_table(p.pid)[: -(-(start + n) // bs)]
            ids.extend(p.token_ids[start:start + n])
            if n == 1:  # decode: one slot, no tensor arithmetic
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                positions.extend(range(start, start + n))
                pos = torch.arange(start, start + n)
                slots.extend((torch.tensor(table)[pos // bs] * bs + pos % bs).tolist())
            segments.append(Segment(row, n, start + n, table, dev))
            if start + n == p.num_tokens:
                sample_rows.append(row + n - 1)
                sampling.append(p)
        positions_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.int64, device=dev), segments)
        if dev.type == "cpu":
            meta.with_row_tables(positions_t)
        return torch.tensor(ids, dtype=torch.int64, device=dev), positions_t, meta, sample_rows, sampling

    def prepare_state(self, batch: ScheduledBatch):
        """Flatten the batch for a recurrent model: `ids` `[N]`, one state segment per item (its rows and its
        slot, fresh when it starts at token 0: after admission or a recompute), and the segment index of each
        item that samples this step."""
        ids: list[int] = []
        segments, sample_rows, sampling = [], [], []
        for p, n in batch.items:
            start = p.num_computed_tokens
            slot = self.block_manager.block_table(p.pid)[0]
            segments.append(StateSegment(len(ids), n, slot, fresh=start == 0))
            ids.extend(p.token_ids[start:start + n])
            if start + n == p.num_tokens:
                sample_rows.append(len(segments) - 1)
                sampling.append(p)
        return torch.tensor(ids, dtype=torch.int64, device=self.device), segments, sample_rows, sampling

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[tuple[Process, int]]:
        self.apply_ops()
        if self.recurrent:
            ids, segments, sample_rows, sampling = self.prepare_state(batch)
            hidden = self.model.forward_state(ids, segments, self.pool.states())
        else:
            ids, positions, meta, sample_rows, sampling = self.prepare(batch)
            hidden = self.model.forward_paged(ids, positions, self.pool.kv_caches, meta)
        if not sampling:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        self._last_logits = logits
        tokens = self.sampler.sample(logits, [p.params for p in sampling], [self.generator(p) for p in sampling],
                                     [p.token_ids for p in sampling]).tolist()
        self.last_logprobs = {}
        want = [i for i, p in enumerate(sampling) if p.params.logprobs is not None]
        if want:
            lp = torch.log_softmax(logits[want].float(), dim=-1)
            for j, i in enumerate(want):
                self.last_logprobs[sampling[i].pid] = logprob_entry(lp[j], tokens[i], sampling[i].params.logprobs)
        return list(zip(sampling, tokens))

    @torch.inference_mode()
    def resample(self, row: int, processes: list[Process]) -> list[int]:
        """One token for each of `processes` from row `row` of the last step's sampling logits, each with its
        own parameters, generator and history (the children of a parallel-sampling fork)."""
        logits = self._last_logits[row:row + 1].expand(len(processes), -1)
        tokens = self.sampler.sample(logits, [p.params for p in processes], [self.generator(p) for p in processes],
                                     [p.token_ids for p in processes]).tolist()
        if any(p.params.logprobs is not None for p in processes):
            lp = torch.log_softmax(self._last_logits[row].float(), dim=-1)
            for p, t in zip(processes, tokens):
                if p.params.logprobs is not None:
                    self.last_logprobs[p.pid] = logprob_entry(lp, t, p.params.logprobs)
        return tokens
