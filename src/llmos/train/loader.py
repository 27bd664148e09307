"""The batch sampler: which token windows each rank trains on at each (optimizer step, micro-step).

Owns the sampling rule that makes training resumable exactly and independent of the number of ranks:
a batch is a pure function of (seed, step, micro-step), never of how many batches came before.
Never tokenizes, never writes files and never touches a model.

The rule. For optimizer step s (0-based) and micro-step m, the global batch is `batch_size` windows of
`seq_len + 1` tokens starting at `default_rng([seed, stream, s, m]).integers(0, len(split) - seq_len,
batch_size)` (numpy's PCG64 seeded through SeedSequence; stream 0 = training, 1 = validation). Rank r
of W takes rows [r * batch_size / W, (r + 1) * batch_size / W). Inputs are `w[:-1]`, targets `w[1:]`;
a target j is ignored (-100, PyTorch's `ignore_index`) where the split's loss mask is 0 at `w[j + 1]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from llmos.errors import DataError

IGNORE_INDEX = -100
TRAIN_STREAM, VAL_STREAM = 0, 1


class Split(Protocol):
    """What the sampler reads: `llmos.train.shards.ShardSplit` or `ArraySplit`."""

    def __len__(self) -> int: ...

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]: ...


class ArraySplit:
    """A token stream in memory (or memory-mapped) with the `ShardSplit` interface.

    `tokens` `[num_tokens]` (any integer dtype); `mask` `[num_tokens]` bool/uint8 or None (all count).
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        self.tokens, self.mask = tokens, mask

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """`(tokens int64 [length], mask bool [length] | None)` from `start`. Raises IndexError past the end."""
        if start < 0 or start + length > len(self.tokens):
            raise IndexError(f"window [{start}, {start + length}) outside a split of {len(self.tokens)} tokens")
        tokens = np.asarray(self.tokens[start:start + length], dtype=np.int64)
        mask = None if self.mask is None else np.asarray(self.mask[start:start + length], dtype=bool)
        return tokens, mask


@dataclass
class Batch:
    inputs: torch.Tensor  # int64 [rows, seq_len]
    targets: torch.Tensor  # int64 [rows, seq_len], IGNORE_INDEX where the loss does not count
    num_targets: int  # targets that count in these rows


class BatchSampler:
    """Deterministic, rank-sliced batches of one split (the rule is in the module docstring).

    Raises `DataError` if the split is shorter than one window, and `ValueError` (a programming error,
    checked by the trainer's config validation first) if `batch_size` is not a multiple of `world_size`.
    """

    def __init__(self, split: Split, batch_size: int, seq_len: int, seed: int, *, stream: int = TRAIN_STREAM,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(split) < seq_len + 1:
            raise DataError(f"a data split of {len(split)} tokens is shorter than one window of --seq-len "
                            f"{seq_len} + 1; add text or lower --seq-len.")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of world_size {world_size}")
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.stream, self.rank, self.world_size = stream, rank, world_size

    def starts(self, step: int, micro: int) -> np.ndarray:
        """Start offsets of the whole global batch, int64 `[batch_size]`."""
        rng = np.random.default_rng([self.seed, self.stream, step, micro])
        return rng.integers(0, len(self.split) - self.seq_len, size=self.batch_size, dtype=np.int64)

    def rows(self) -> slice:
        per_rank = self.batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def batch(self, step: int, micro: int = 0) -> Batch:
        """This rank's rows of the global batch at (step, micro)."""
        inputs, targets, count = [], [], 0
        for start in self.starts(step, micro)[self.rows()]:
            tokens, mask = self.split.window(int(start), self.seq_len + 1)
            target = tokens[1:].copy()
            if mask is not None:
                target[~mask[1:]] = IGNORE_INDEX
            count += int((target != IGNORE_INDEX).sum())
            inputs.append(tokens[:-1])
            targets.append(target)
        return Batch(torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets)), count)

    def global_targets(self, step: int, micros: int) -> int:
        """Targets that count in the whole optimizer step (all ranks, micro-steps 0..micros-1): the loss
        normaliser, so a step's loss is the mean over its counted tokens however it is split."""
        probe = self.split.window(0, 1)[1]
        if probe is None:
            return self.batch_size * self.seq_len * micros
        total = 0
        for micro in range(micros):
            for start in self.starts(step, micro):
                total += int(self.split.window(int(start), self.seq_len + 1)[1][1:].sum())
        return total
