"""Paged KV memory: block accounting (BlockManager), the preallocated tensors (KVPool),
and the memory budget that sizes them.

BlockManager owns which block belongs to which pid; it never touches tensors, processes
or the scheduler's queues. KVPool owns the tensors; it never decides who gets a block.
"""

from __future__ import annotations

import math
import os
import re
from collections import deque

import torch

from llmos.errors import InvalidRequestError


class BlockManager:
    """Paged KV accounting, no tensors (Kwon et al. 2023, "PagedAttention"; nano-vllm).

    A block holds K/V for `block_size` consecutive tokens of one process. Each pid has
    a block table, the list of its block ids in token order: token i lives in slot
    `table[i // block_size] * block_size + i % block_size`.

    Invariants (check_invariants):
      - free + used == num_blocks; a block is either in the free queue (ref count 0) or
        referenced by at least one table (ref count == number of references); never both.
      - no block id appears twice in the free queue or twice in one table.
    Ref counts are all 1 today; fork / copy-on-write / prefix caching will share blocks.
    """

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that cover `num_tokens` tokens: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    def _num_new_blocks(self, pid: int, num_tokens: int) -> int:
        have = len(self.block_tables.get(pid, ()))
        return max(0, self.blocks_needed(num_tokens) - have)

    def can_allocate(self, pid: int, num_tokens: int) -> bool:
        """Can pid's table be grown to cover `num_tokens` tokens in total?"""
        return self._num_new_blocks(pid, num_tokens) <= len(self.free_blocks)

    def allocate(self, pid: int, num_tokens: int) -> list[int]:
        """Grow pid's table (never shrink it) to cover `num_tokens` tokens; return a copy.

        Raises RuntimeError when there are not enough free blocks: callers check
        `can_allocate` first, so that is a programming error.
        """
        n = self._num_new_blocks(pid, num_tokens)
        if n > len(self.free_blocks):
            raise RuntimeError(f"allocate(pid={pid}, num_tokens={num_tokens}): needs {n} new blocks, "
                               f"{len(self.free_blocks)} free (call can_allocate first)")
        table = self.block_tables.setdefault(pid, [])
        for _ in range(n):
            block = self.free_blocks.popleft()
            assert self.ref_counts[block] == 0, f"block {block} in the free queue is referenced"
            self.ref_counts[block] = 1
            table.append(block)
        return list(table)

    def block_table(self, pid: int) -> list[int]:
        """A copy of pid's block table (empty for a pid that holds no block)."""
        return list(self.block_tables.get(pid, ()))

    def free(self, pid: int) -> None:
        """Drop every reference pid holds; a block whose ref count reaches 0 goes back to
        the free queue at once. A no-op for a pid that holds no block."""
        for block in self.block_tables.pop(pid, ()):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)

    def check_invariants(self) -> None:
        """Raise AssertionError, saying which block is wrong, if the accounting is broken."""
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), f"duplicate block in the free queue: {sorted(self.free_blocks)}"
        refs = [0] * self.num_blocks
        for pid, table in self.block_tables.items():
            assert len(set(table)) == len(table), f"pid {pid}: duplicate block in table {table}"
            for block in table:
                assert 0 <= block < self.num_blocks, f"pid {pid}: block id {block} out of range"
                assert block not in free, f"block {block} is both free and in pid {pid}'s table"
                refs[block] += 1
        used = {b for b in range(self.num_blocks) if refs[b] > 0}
        assert len(free) + len(used) == self.num_blocks, (
            f"leak: {len(free)} free + {len(used)} used != {self.num_blocks} blocks; "
            f"lost: {sorted(set(range(self.num_blocks)) - free - used)}")
        bad = [b for b in range(self.num_blocks) if self.ref_counts[b] != refs[b]]
        assert not bad, f"ref counts wrong for blocks {bad}: stored {[self.ref_counts[b] for b in bad]}, " \
                        f"live references {[refs[b] for b in bad]}"


class KVPool:
    """The preallocated KV cache: `kv_caches[layer] = (k, v)`, each
    `[num_blocks, block_size, num_kv_heads, head_dim]`, left uninitialized: attention reads only
    positions written before (a slot is written before any query attends to it), so on the CPU a
    block costs resident memory only once a process first uses it.
    Block b of every layer belongs to whoever the BlockManager gave block b."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32, device="cpu"):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, K and V: 2*layers*block_size*kv_heads*head_dim*elem."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    @staticmethod
    def num_blocks_for_budget(budget_bytes: int, bytes_per_block: int) -> int:
        """How many whole blocks fit in `budget_bytes` (may be 0: the caller decides if that is an error)."""
        return int(budget_bytes) // bytes_per_block

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv_caches)


_UNITS = {"": 1, "b": 1,
          "k": 2**10, "ki": 2**10, "kib": 2**10, "kb": 10**3,
          "m": 2**20, "mi": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gi": 2**30, "gib": 2**30, "gb": 10**9,
          "t": 2**40, "ti": 2**40, "tib": 2**40, "tb": 10**12}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$")
_FORMS = ('a number of bytes (e.g. 536870912), a size such as "512MiB", "2GiB", "1.5GB" or "800M" '
          '(KiB/MiB/GiB/TiB and bare K/M/G/T are powers of 1024, KB/MB/GB/TB powers of 1000), '
          'or a fraction of free memory in (0, 1] such as 0.9 or "90%"')


def parse_memory_budget(value: str | int | float, device="cpu") -> int:
    """A KV-cache memory budget in bytes, from `value`:
    an int (bytes), a float in (0, 1] (that fraction of the device's free memory; a whole
    float above 1 such as 4e9 is bytes), or a string: "512MiB", "1.5GB", "800M",
    "1073741824", "0.9", "90%".
    Raises InvalidRequestError (listing the accepted forms) for anything else or <= 0 bytes.
    """
    bad = InvalidRequestError(f"invalid memory budget {value!r}: give {_FORMS}")
    if isinstance(value, str):
        value = _parse_size_string(value.strip().lower(), bad)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if isinstance(value, float):
        if not math.isfinite(value) or value <= 0 or (value > 1 and not value.is_integer()):
            raise bad
        if value <= 1:
            return int(value * free_memory_bytes(device))
        value = int(value)
    if value <= 0:
        raise bad
    return value


def _parse_size_string(s: str, bad: Exception) -> int | float:
    """"512mib" -> 536870912 (int, bytes); "0.9" -> 0.9 and "90%" -> 0.9 (float: a fraction)."""
    if s.endswith("%"):
        try:
            percent = float(s[:-1])
        except ValueError:
            raise bad from None
        if not 0 < percent <= 100:
            raise bad
        return percent / 100
    m = _SIZE.match(s)
    if m is None or m.group(2) not in _UNITS:
        raise bad
    number, unit = m.group(1), m.group(2)
    if number.isdigit():
        return int(number) * _UNITS[unit]
    if unit == "":
        return float(number)
    return int(float(number) * _UNITS[unit])


def free_memory_bytes(device="cpu") -> int:
    """Memory free now on `device`, in bytes. CPU: MemAvailable from /proc/meminfo (else
    available pages from sysconf); CUDA: torch.cuda.mem_get_info. Other devices raise
    InvalidRequestError (give the budget in bytes instead)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type != "cpu":
        raise InvalidRequestError(f"cannot measure free memory on {dev}: give the KV budget in bytes (e.g. 4GiB)")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
