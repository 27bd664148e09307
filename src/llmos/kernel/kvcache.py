"""Paged KV memory: block accounting (BlockManager), the preallocated tensors (KVPool, SwapPool, and
StatePool for recurrent models), the replay of the manager's data moves (apply_block_ops), and the
memory budget that sizes them.

BlockManager owns which block belongs to which pid, which full blocks are cached by content, and
what data must move; it never touches tensors, processes or the scheduler's queues. KVPool, StatePool
and SwapPool own the tensors; they never decide who gets a block.

State slots (recurrent models such as the LSTM). A recurrent model's memory of a sequence is a
fixed-size state, (h, c) per layer, whatever its length. The kernel maps it onto the same machinery
with no special case in BlockManager or the scheduler: the block manager's block size is the model's
context length, so every process needs exactly one block (`blocks_needed(n) == 1` for 1 <= n <= context),
and block b is state slot b of a StatePool, a KVPool of one one-token "block" per slot (one head of width
hidden: `kv_caches[layer] = (h, c)`, each [num_slots, 1, 1, hidden]). So allocate/free, ref counts,
per-owner block limits and the accounting invariants count slots; a fork shares the parent's slot and
copy-on-write copies it on the first write after the fork (every step writes the slot, so any step is a
write from `num_computed_tokens` on); swap out/in and hibernation move slot contents through the same
copy log, SwapPool and images. The prefix cache is off for state slots: a state is not a content-
addressed token block (it summarises the whole prefix, and is overwritten every step). Preemption by
recompute frees the slot; the process's next step starts from the zero state and recomputes all tokens.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch

from llmos.errors import InvalidRequestError

BlockOp = tuple[str, list[tuple[int, int]]]
"""One logged data move: ("copy", [(src_dev, dst_dev)]), ("swap_out", [(dev, swap)]) or
("swap_in", [(swap, dev)]); block ids, not bytes."""


def chain_hash(prev: bytes, salt: str, token_ids: Sequence[int]) -> bytes:
    """The content hash of one full block (vLLM v1 automatic prefix caching):
    blake2b(prev + salt utf-8 + token ids as little-endian int64), 16-byte digest.

    `prev` is the previous block's chain hash (b"" for block 0), so equal hashes mean an equal
    whole prefix, not just equal block contents. For a given block index the parts cannot run into
    each other: `prev` is 0 bytes (block 0) or 16, the token bytes are len(token_ids) * 8, so the
    salt's length is fixed too. Never Python's hash(): it is seeded per process and only 64 bits.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(prev)
    h.update(salt.encode())
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


class BlockManager:
    """Paged KV accounting with copy-on-write, a prefix cache and swap space; no tensors
    (Kwon et al. 2023, "PagedAttention"; prefix caching and its hash scheme after vLLM v1's
    KVCacheManager; nano-vllm's block_manager).

    A block holds K/V for `block_size` consecutive tokens. Each pid has a block table, its block ids
    in token order: token i lives in slot `table[i // block_size] * block_size + i % block_size`.
    Several tables may hold the same block (fork, prefix hits); its ref count says how many.

    Every device block is in exactly one of three sets:
      FREE    ref 0, no hash, in the `free_blocks` queue;
      CACHED  ref 0, holds the chain hash of its content (see `chain_hash`), in `cached_blocks`, an
              LRU order (least recently released first); still findable by `allocate_prefix`;
      USED    ref >= 1, may hold a hash (a full block of computed tokens, immutable from then on).
    `num_free_blocks` = FREE + CACHED: what can be allocated. Allocation takes FREE blocks first,
    then evicts the least recently used CACHED block (its hash is forgotten).

    Swap space is a second budget of `num_swap_blocks` host blocks: `swap_tables[pid]` holds the
    swap blocks of a swapped-out pid, which then holds no device block.

    Data moves. The manager never copies tensors. Each move it decides is appended to an ordered log
    of `BlockOp`s that `take_ops()` returns and clears; the runner replays it, in order, with
    `apply_block_ops` before the next forward pass. The manager reuses a block the moment its last
    reference goes, before the logged move that reads it has happened, yet ordered replay is exact:
    each op reads its sources after every earlier op and before every later one, which is exactly
    the state the manager saw when it logged it. So when block b is freed after op k (say swapped
    out) and is the destination of a later op j (a copy-on-write copy, a swap-in), op k has read b
    before op j overwrites it; and the forward pass, the only other writer, runs after the whole
    log. Within one op the destinations are distinct fresh blocks, never a source of the same op,
    so one gathered copy per op is exact. A hashed block is never the destination of an op nor
    written by a forward pass (copy-on-write and the prefix-hit cap keep writes away from it), so
    a prefix hit always attaches data that is already there.

    Invariants (check_invariants):
      - free + cached + used == num_blocks, the three sets disjoint;
      - ref count of each block == number of table references to it; no block twice in one table;
      - FREE blocks hold no hash, CACHED ones do; `hash_to_block` and the per-block hashes agree;
      - free swap + used swap == num_swap_blocks, no swap block in two tables, and no pid both
        swapped and holding device blocks.

    Raises ValueError for misuse (e.g. forking into a pid that holds blocks, allocating for a
    swapped pid) and RuntimeError when asked for more blocks than exist: callers check the
    matching `can_*` first, so both are programming errors.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, num_swap_blocks: int = 0,
                 enable_prefix_cache: bool = True):
        if num_blocks < 1 or block_size < 1 or num_swap_blocks < 0:
            raise ValueError(f"BlockManager needs num_blocks >= 1, block_size >= 1 and num_swap_blocks >= 0, "
                             f"got {num_blocks}, {block_size}, {num_swap_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.cached_blocks: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.block_tables: dict[int, list[int]] = {}
        self.chain_hashes: dict[int, list[bytes]] = {}  # pid -> h_0, h_1, ... of its full computed blocks
        self.num_committed: dict[int, int] = {}  # pid -> leading blocks commit() has already registered
        self.num_swap_blocks = num_swap_blocks
        self.free_swap_blocks: deque[int] = deque(range(num_swap_blocks))
        self.swap_tables: dict[int, list[int]] = {}
        self.ops: list[BlockOp] = []
        self.prefix_queries = 0  # tokens looked up by allocate_prefix
        self.prefix_hits = 0  # tokens found cached
        self.evictions = 0  # CACHED blocks reclaimed

    # ---- sizes ----------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now: FREE + CACHED."""
        return len(self.free_blocks) + len(self.cached_blocks)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_free_swap_blocks(self) -> int:
        return len(self.free_swap_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that cover `num_tokens` tokens: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    def block_table(self, pid: int) -> list[int]:
        """A copy of pid's device block table (empty for a pid that holds no device block)."""
        return list(self.block_tables.get(pid, ()))

    def is_swapped(self, pid: int) -> bool:
        return pid in self.swap_tables

    def num_swapped_blocks(self, pid: int) -> int:
        return len(self.swap_tables.get(pid, ()))

    def num_resident_blocks(self, pid: int) -> int:
        return len(self.block_tables.get(pid, ()))

    def take_ops(self) -> list[BlockOp]:
        """Return the data moves logged since the last call, oldest first, and clear the log.
        Replay them in order (`apply_block_ops`) before the next forward pass."""
        ops, self.ops = self.ops, []
        return ops

    def stats(self) -> dict:
        """Prefix-cache and occupancy counters. Tokens: prefix_queries (looked up by
        allocate_prefix), prefix_hits (found cached), hit_rate = hits / queries (0.0 before any
        query). Blocks: evictions (cumulative), the rest a snapshot."""
        return {"prefix_queries": self.prefix_queries, "prefix_hits": self.prefix_hits,
                "hit_rate": self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0,
                "cached_blocks": self.num_cached_blocks, "evictions": self.evictions,
                "num_blocks": self.num_blocks, "free_blocks": self.num_free_blocks,
                "used_blocks": self.num_used_blocks, "num_swap_blocks": self.num_swap_blocks,
                "free_swap_blocks": self.num_free_swap_blocks,
                "used_swap_blocks": self.num_swap_blocks - self.num_free_swap_blocks}

    # ---- the two primitives: take one block, release a table -------------------------------------

    def _take_block(self) -> int:
        """A block with ref count 1: a FREE one, else evict the least recently used CACHED one."""
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.cached_blocks.popitem(last=False)
            del self.hash_to_block[self.block_hashes[block]]
            self.block_hashes[block] = None
            self.evictions += 1
        assert self.ref_counts[block] == 0, f"block {block} on a free list is referenced"
        self.ref_counts[block] = 1
        return block

    def _release(self, table: list[int]) -> None:
        """Drop one reference to each block of `table`, last block first, so that a prompt's tail
        is evicted before its head (vLLM). A block reaching ref 0 goes to the most recently used
        end of CACHED if it holds a hash, else to FREE."""
        for block in reversed(table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hashes[block] is not None:
                    self.cached_blocks[block] = None
                else:
                    self.free_blocks.append(block)

    # ---- allocate / copy-on-write / fork / free ---------------------------------------------------

    def _num_new_blocks(self, pid: int, num_tokens: int) -> int:
        have = len(self.block_tables.get(pid, ()))
        return max(0, self.blocks_needed(num_tokens) - have)

    def _cow_indices(self, pid: int, num_tokens: int, write_from: int | None) -> list[int]:
        """Indices of pid's blocks that cover a position in [write_from, num_tokens) and are shared."""
        if write_from is None:
            return []
        if write_from < 0:
            raise ValueError(f"write_from must be >= 0, got {write_from}")
        table = self.block_tables.get(pid, ())
        end = min(len(table), self.blocks_needed(num_tokens))
        return [i for i in range(write_from // self.block_size, end) if self.ref_counts[table[i]] > 1]

    def can_allocate(self, pid: int, num_tokens: int, write_from: int | None = None) -> bool:
        """Can pid's table be grown to cover `num_tokens` tokens in total, with copy-on-write of the
        shared blocks it will write from token `write_from` on? False for a swapped-out pid."""
        if pid in self.swap_tables:
            return False
        need = self._num_new_blocks(pid, num_tokens) + len(self._cow_indices(pid, num_tokens, write_from))
        return need <= self.num_free_blocks

    def allocate(self, pid: int, num_tokens: int, write_from: int | None = None) -> list[int]:
        """Grow pid's table (never shrink it) to cover `num_tokens` tokens; return a copy.

        With `write_from`, the caller is about to write tokens [write_from, num_tokens): each block
        covering one of them that is shared (ref count > 1) is first replaced by a fresh block of
        pid's own, logged as ("copy", [(old, new), ...]) (copy-on-write, PagedAttention sec. 4.4).
        Raises RuntimeError when there are not enough free blocks (call `can_allocate` first),
        ValueError for a swapped-out pid, AssertionError if a write would land in a hashed block.
        """
        if pid in self.swap_tables:
            raise ValueError(f"allocate(pid={pid}): pid is swapped out; swap_in or drop_swapped first")
        cow = self._cow_indices(pid, num_tokens, write_from)
        n = self._num_new_blocks(pid, num_tokens)
        if n + len(cow) > self.num_free_blocks:
            raise RuntimeError(f"allocate(pid={pid}, num_tokens={num_tokens}): needs {n} new blocks and "
                               f"{len(cow)} copies, {self.num_free_blocks} free (call can_allocate first)")
        table = self.block_tables.setdefault(pid, [])
        if write_from is not None:
            for i in range(write_from // self.block_size, min(len(table), self.blocks_needed(num_tokens))):
                assert self.block_hashes[table[i]] is None, (
                    f"pid {pid}: writing from token {write_from} would change block {table[i]}, a full "
                    f"cached block (commit() registered it): computed tokens are never rewritten")
        if cow:
            pairs = []
            for i in cow:
                old, new = table[i], self._take_block()
                self.ref_counts[old] -= 1  # was > 1: still referenced by someone else
                table[i] = new
                pairs.append((old, new))
            self.ops.append(("copy", pairs))
        for _ in range(n):
            table.append(self._take_block())
        return list(table)

    def fork(self, parent_pid: int, child_pid: int) -> None:
        """Give `child_pid` the parent's table: the same blocks, each ref count +1, and the parent's
        chain hashes. Nothing is copied now; copy-on-write happens when either one writes into a
        shared block (`allocate(..., write_from=...)`).

        Raises ValueError when parent and child are the same pid, the parent holds no table or is
        swapped out, or the child holds a block or is swapped out.
        """
        if parent_pid == child_pid:
            raise ValueError(f"fork({parent_pid}, {child_pid}): a pid cannot fork into itself")
        if parent_pid not in self.block_tables:
            raise ValueError(f"fork: parent pid {parent_pid} holds no block table"
                             + (" (it is swapped out; swap_in first)" if parent_pid in self.swap_tables else ""))
        if self.block_tables.get(child_pid) or child_pid in self.swap_tables:
            raise ValueError(f"fork: child pid {child_pid} already holds blocks; free it first")
        table = list(self.block_tables[parent_pid])
        for block in table:
            self.ref_counts[block] += 1
        self.block_tables[child_pid] = table
        self.chain_hashes[child_pid] = list(self.chain_hashes.get(parent_pid, ()))
        self.num_committed[child_pid] = self.num_committed.get(parent_pid, 0)

    def free(self, pid: int) -> None:
        """Drop every reference pid holds, device and swap, and forget its chain hashes. Device
        blocks are released last first; one reaching ref 0 goes to CACHED if it holds a hash (it
        can still be hit), else to FREE. A no-op for a pid that holds nothing."""
        self._release(self.block_tables.pop(pid, []))
        self.free_swap_blocks.extend(self.swap_tables.pop(pid, ()))
        self.chain_hashes.pop(pid, None)
        self.num_committed.pop(pid, None)

    # ---- prefix cache ------------------------------------------------------------------------------

    def allocate_prefix(self, pid: int, token_ids: Sequence[int], num_tokens: int, salt: str = "") -> int | None:
        """First allocation of a pid, reusing cached blocks of its longest cached prefix
        (automatic prefix caching, vLLM v1).

        Looks up the leading full blocks of `token_ids[:-1]` by chain hash (`salt`, e.g. the owner,
        keeps different owners apart); the last token is always left to compute, so a hit block is
        never written. Then, all or nothing: if the hit blocks plus the new blocks that cover
        `num_tokens` tokens (at least hit tokens + 1) fit, attach the hits (ref +1; a CACHED hit
        leaves the LRU), allocate the rest, count the query (len(token_ids) tokens) and the hits,
        and return the tokens covered by hits, a multiple of block_size: the pid's computed tokens
        start there. Else change nothing and return None. With the cache disabled it is a plain
        `allocate` returning 0. Raises ValueError if pid already holds blocks or is swapped out.
        """
        if self.block_tables.get(pid) or pid in self.swap_tables:
            raise ValueError(f"allocate_prefix(pid={pid}): pid already holds blocks; it is for a first "
                             f"allocation (free or drop_swapped first)")
        if not self.enable_prefix_cache:
            if not self.can_allocate(pid, num_tokens):
                return None
            self.allocate(pid, num_tokens)
            return 0
        bs, prev = self.block_size, b""
        hashes, hits = [], []
        for i in range((len(token_ids) - 1) // bs):
            prev = chain_hash(prev, salt, token_ids[i * bs:(i + 1) * bs])
            block = self.hash_to_block.get(prev)
            if block is None:
                break
            hashes.append(prev)
            hits.append(block)
        hit_tokens = len(hits) * bs
        if hits:
            num_tokens = max(num_tokens, hit_tokens + 1)
        new = self.blocks_needed(num_tokens) - len(hits)
        if new > self.num_free_blocks - sum(self.ref_counts[b] == 0 for b in hits):
            return None
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.cached_blocks[block]
            self.ref_counts[block] += 1
        self.block_tables[pid] = hits + [self._take_block() for _ in range(new)]
        self.chain_hashes[pid] = hashes
        self.num_committed[pid] = len(hits)
        self.prefix_queries += len(token_ids)
        self.prefix_hits += hit_tokens
        return hit_tokens

    def commit(self, pid: int, token_ids: Sequence[int], num_computed_tokens: int, salt: str = "") -> None:
        """Register, under its chain hash, each of pid's blocks that has become full of computed
        tokens since the last commit (call after the forward pass that computed them). A block
        whose hash is already registered to another block stays unhashed (no duplicate entries).
        Chain hashes are kept per pid, so each is computed once. A no-op with the cache disabled.
        Raises ValueError for a swapped-out pid or if `num_computed_tokens` exceeds `token_ids`
        or pid's table.
        """
        if not self.enable_prefix_cache:
            return
        if pid in self.swap_tables:
            raise ValueError(f"commit(pid={pid}): pid is swapped out; swap_in first")
        table = self.block_tables.get(pid, [])
        if num_computed_tokens > len(token_ids) or self.blocks_needed(num_computed_tokens) > len(table):
            raise ValueError(f"commit(pid={pid}): {num_computed_tokens} computed tokens, but {len(token_ids)} "
                             f"token ids and {len(table)} blocks of {self.block_size}")
        bs, full = self.block_size, num_computed_tokens // self.block_size
        hashes = self.chain_hashes.setdefault(pid, [])
        for i in range(len(hashes), full):
            hashes.append(chain_hash(hashes[-1] if hashes else b"", salt, token_ids[i * bs:(i + 1) * bs]))
        start = self.num_committed.get(pid, 0)
        for i in range(start, full):
            block, h = table[i], hashes[i]
            if self.block_hashes[block] is None and h not in self.hash_to_block:
                self.block_hashes[block] = h
                self.hash_to_block[h] = block
        self.num_committed[pid] = max(start, full)

    # ---- swap space ----------------------------------------------------------------------------------

    def can_swap_out(self, pid: int) -> bool:
        """Does pid hold device blocks, is it not swapped out, and do its blocks fit in free swap?"""
        table = self.block_tables.get(pid)
        return bool(table) and pid not in self.swap_tables and len(table) <= len(self.free_swap_blocks)

    def swap_out(self, pid: int) -> list[tuple[int, int]]:
        """Move pid to swap: one swap block per table entry, logged as ("swap_out", [(dev, swap)]);
        then pid's device references are released exactly like `free` (shared blocks stay with
        the others, hashed ones go to CACHED). pid keeps its chain hashes. Returns the pairs.
        Raises ValueError if pid holds no device block or is already swapped out, RuntimeError if
        swap space is short (call `can_swap_out` first)."""
        table = self.block_tables.get(pid)
        if not table or pid in self.swap_tables:
            raise ValueError(f"swap_out(pid={pid}): pid holds no device block or is already swapped out")
        if len(table) > len(self.free_swap_blocks):
            raise RuntimeError(f"swap_out(pid={pid}): needs {len(table)} swap blocks, "
                               f"{len(self.free_swap_blocks)} free (call can_swap_out first)")
        del self.block_tables[pid]
        swap = [self.free_swap_blocks.popleft() for _ in table]
        pairs = list(zip(table, swap))
        self.ops.append(("swap_out", pairs))
        self._release(table)
        self.swap_tables[pid] = swap
        self.num_committed[pid] = 0  # the blocks it gets back hold no hash
        return list(pairs)

    def _swap_in_blocks(self, pid: int, num_tokens: int) -> int:
        return max(len(self.swap_tables[pid]), self.blocks_needed(num_tokens))

    def can_swap_in(self, pid: int, num_tokens: int = 0) -> bool:
        """Is pid swapped out, and do fresh device blocks for its swapped table (and for
        `num_tokens` tokens in total, if more) fit now?"""
        return pid in self.swap_tables and self._swap_in_blocks(pid, num_tokens) <= self.num_free_blocks

    def swap_in(self, pid: int, num_tokens: int = 0) -> list[int]:
        """Bring pid back: fresh device blocks for its swapped table, plus more to cover
        `num_tokens` tokens, logged as ("swap_in", [(swap, dev)]); its swap blocks are freed. The
        new blocks hold no hash until `commit` registers them again. Returns pid's new table.
        Raises ValueError if pid is not swapped out, RuntimeError if device blocks are short
        (call `can_swap_in` first)."""
        if pid not in self.swap_tables:
            raise ValueError(f"swap_in(pid={pid}): pid is not swapped out")
        n = self._swap_in_blocks(pid, num_tokens)
        if n > self.num_free_blocks:
            raise RuntimeError(f"swap_in(pid={pid}): needs {n} blocks, {self.num_free_blocks} free "
                               f"(call can_swap_in first)")
        swap = self.swap_tables.pop(pid)
        table = [self._take_block() for _ in range(n)]
        self.ops.append(("swap_in", list(zip(swap, table))))
        self.free_swap_blocks.extend(swap)
        self.block_tables[pid] = table
        self.num_committed[pid] = 0
        return list(table)

    def drop_swapped(self, pid: int) -> None:
        """Free pid's swap blocks without swapping in (recompute instead): pid then holds nothing
        and its chain hashes are forgotten. Raises ValueError if pid is not swapped out."""
        if pid not in self.swap_tables:
            raise ValueError(f"drop_swapped(pid={pid}): pid is not swapped out")
        self.free(pid)

    # ---- checks ------------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError, saying which block is wrong, if the accounting is broken."""
        free, cached = set(self.free_blocks), set(self.cached_blocks)
        assert len(free) == len(self.free_blocks), f"duplicate block in the free queue: {sorted(self.free_blocks)}"
        assert not free & cached, f"blocks both free and cached: {sorted(free & cached)}"
        refs = [0] * self.num_blocks
        for pid, table in self.block_tables.items():
            assert len(set(table)) == len(table), f"pid {pid}: duplicate block in table {table}"
            for block in table:
                assert 0 <= block < self.num_blocks, f"pid {pid}: block id {block} out of range"
                assert block not in free, f"block {block} is both free and in pid {pid}'s table"
                assert block not in cached, f"block {block} is both cached (evictable) and in pid {pid}'s table"
                refs[block] += 1
        used = {b for b in range(self.num_blocks) if refs[b] > 0}
        assert len(free) + len(cached) + len(used) == self.num_blocks, (
            f"leak: {len(free)} free + {len(cached)} cached + {len(used)} used != {self.num_blocks} blocks; "
            f"lost: {sorted(set(range(self.num_blocks)) - free - cached - used)}")
        bad = [b for b in range(self.num_blocks) if self.ref_counts[b] != refs[b]]
        assert not bad, f"ref counts wrong for blocks {bad}: stored {[self.ref_counts[b] for b in bad]}, " \
                        f"live references {[refs[b] for b in bad]}"
        assert all(self.block_hashes[b] is None for b in free), "a FREE block holds a hash"
        assert all(self.block_hashes[b] is not None for b in cached), "a CACHED block holds no hash"
        for h, block in self.hash_to_block.items():
            assert self.block_hashes[block] == h, f"hash_to_block maps a hash to block {block}, which holds another"
        assert sum(h is not None for h in self.block_hashes) == len(self.hash_to_block), "a block hash not registered"
        free_swap = set(self.free_swap_blocks)
        assert len(free_swap) == len(self.free_swap_blocks), f"duplicate swap block free: {sorted(free_swap)}"
        seen: set[int] = set()
        for pid, swap in self.swap_tables.items():
            assert swap, f"pid {pid} is swapped out with no swap block"
            assert not self.block_tables.get(pid), f"pid {pid} is swapped out yet holds device blocks"
            for block in swap:
                assert 0 <= block < self.num_swap_blocks, f"pid {pid}: swap block {block} out of range"
                assert block not in free_swap, f"swap block {block} is both free and in pid {pid}'s swap table"
                assert block not in seen, f"swap block {block} is in two swap tables"
                seen.add(block)
        assert len(free_swap) + len(seen) == self.num_swap_blocks, (
            f"swap leak: {len(free_swap)} free + {len(seen)} used != {self.num_swap_blocks}")


class _PagedTensors:
    """K/V tensors in the paged layout, `kv_caches[layer] = (k, v)`, each
    `[num_blocks, block_size, num_kv_heads, head_dim]`; shared by KVPool and SwapPool."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device, pin_memory: bool = False):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.device = torch.device(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)

        def empty():
            return torch.empty(shape, dtype=dtype, device=self.device, pin_memory=pin_memory)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [(empty(), empty()) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv_caches)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(block_ids), dtype=torch.int64, device=self.device)

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Blocks `block_ids` (n of them) of every layer, K and V, as one CPU tensor
        `[num_layers, 2, n, block_size, num_kv_heads, head_dim]` (e.g. for hibernation)."""
        idx = self._index(block_ids)
        return torch.stack([torch.stack((k.index_select(0, idx), v.index_select(0, idx)))
                            for k, v in self.kv_caches]).cpu()

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Write `data` `[num_layers, 2, n, block_size, num_kv_heads, head_dim]` (any device, cast to
        this dtype) into the n distinct blocks `block_ids`. Raises ValueError on a shape mismatch."""
        idx = self._index(block_ids)
        want = (self.num_layers, 2, len(idx), self.block_size, self.num_kv_heads, self.head_dim)
        if tuple(data.shape) != want:
            raise ValueError(f"write_blocks: data has shape {tuple(data.shape)}, expected {want}")
        data = data.to(self.device, self.dtype)
        for layer, (k, v) in enumerate(self.kv_caches):
            k.index_copy_(0, idx, data[layer, 0])
            v.index_copy_(0, idx, data[layer, 1])


class KVPool(_PagedTensors):
    """The preallocated KV cache: `kv_caches[layer] = (k, v)`, each
    `[num_blocks, block_size, num_kv_heads, head_dim]`, left uninitialized: attention reads only
    positions written before (a slot is written before any query attends to it), so on the CPU a
    block costs resident memory only once a process first uses it.
    Block b of every layer belongs to whoever the BlockManager gave block b."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__(num_layers, num_kv_heads, head_dim, num_blocks, block_size, dtype, device)

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

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy block src to block dst for each (src, dst) in `pairs`, every layer, K and V: one
        gather and one scatter per tensor (all sources are read before any destination is written).
        Destinations must be distinct."""
        if not pairs:
            return
        src = self._index([s for s, _ in pairs])
        dst = self._index([d for _, d in pairs])
        for k, v in self.kv_caches:
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))


class StatePool(KVPool):
    """Recurrent state slots (see the module docstring) in the KV pool's layout, so that copy-on-write
    copies, swaps (`apply_block_ops`, SwapPool) and hibernation move them exactly as they move K/V blocks:
    `kv_caches[layer] = (h, c)`, each `[num_slots, 1, 1, hidden]`; slot s of every layer belongs to
    whoever the BlockManager gave block s. Left uninitialized: a process's first step starts from zeros
    and never reads its slot (`StateSegment.fresh`)."""

    def __init__(self, num_layers: int, hidden_size: int, num_slots: int, dtype: torch.dtype = torch.float32,
                 device="cpu"):
        super().__init__(num_layers, 1, hidden_size, num_slots, block_size=1, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_slot(num_layers: int, hidden_size: int, dtype: torch.dtype) -> int:
        """Bytes one slot takes: h and c of every layer, 2 * layers * hidden * element size."""
        return KVPool.bytes_per_block(num_layers, 1, hidden_size, 1, dtype)

    @property
    def hidden_size(self) -> int:
        return self.head_dim

    def states(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer `(h, c)`, each `[num_slots, hidden]`: views of the pool the model reads and writes in place."""
        return [(h.view(self.num_blocks, self.head_dim), c.view(self.num_blocks, self.head_dim))
                for h, c in self.kv_caches]

    def read_state(self, slot: int) -> torch.Tensor:
        """Slot `slot`'s state as a CPU tensor `[num_layers, 2 (h, c), hidden]`."""
        return self.read_blocks([slot]).reshape(self.num_layers, 2, self.head_dim)

    def write_state(self, slot: int, state: torch.Tensor) -> None:
        """Write `state` `[num_layers, 2, hidden]` (any device, cast to this dtype) into slot `slot`.
        Raises ValueError on a shape mismatch."""
        want = (self.num_layers, 2, self.head_dim)
        if tuple(state.shape) != want:
            raise ValueError(f"write_state: state has shape {tuple(state.shape)}, expected {want}")
        self.write_blocks([slot], state.reshape(self.num_layers, 2, 1, 1, 1, self.head_dim))


class SwapPool(_PagedTensors):
    """Host (CPU) swap space for KV blocks: the same layout as KVPool, `kv_caches[layer] = (k, v)`,
    each `[num_swap_blocks, block_size, num_kv_heads, head_dim]`, in pinned memory when CUDA is
    available (faster transfers). `num_swap_blocks` may be 0 (no swap). Block s belongs to whoever
    the BlockManager gave swap block s."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_swap_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32):
        pin = num_swap_blocks > 0 and torch.cuda.is_available()
        super().__init__(num_layers, num_kv_heads, head_dim, num_swap_blocks, block_size, dtype, "cpu", pin_memory=pin)

    @property
    def num_swap_blocks(self) -> int:
        return self.num_blocks


def _move_blocks(src: _PagedTensors, dst: _PagedTensors, pairs: Sequence[tuple[int, int]]) -> None:
    """Copy block s of `src` to block d of `dst` for each (s, d), every layer, K and V (swap traffic)."""
    if (src.num_layers, src.block_size, src.num_kv_heads, src.head_dim) != \
            (dst.num_layers, dst.block_size, dst.num_kv_heads, dst.head_dim):
        raise ValueError("swap pool and KV pool have different layouts (layers, block_size, kv heads, head_dim)")
    src_idx = src._index([s for s, _ in pairs])
    dst_idx = dst._index([d for _, d in pairs])
    for (sk, sv), (dk, dv) in zip(src.kv_caches, dst.kv_caches):
        dk.index_copy_(0, dst_idx, sk.index_select(0, src_idx).to(dk.device, dk.dtype))
        dv.index_copy_(0, dst_idx, sv.index_select(0, src_idx).to(dv.device, dv.dtype))


def apply_block_ops(ops: Sequence[BlockOp], pool: KVPool, swap_pool: SwapPool | None = None) -> None:
    """Replay a `BlockManager.take_ops()` log on the tensors, in order (see BlockManager for why order
    makes it exact): "copy" within `pool`, "swap_out" pool -> swap_pool, "swap_in" swap_pool -> pool.
    Call before the forward pass that follows the scheduling step. Raises ValueError for an unknown
    op, or a swap op without a swap pool."""
    for kind, pairs in ops:
        if not pairs:
            continue
        if kind == "copy":
            pool.copy_blocks(pairs)
        elif kind in ("swap_out", "swap_in"):
            if swap_pool is None:
                raise ValueError(f"apply_block_ops: a {kind} op needs a swap pool")
            if kind == "swap_out":
                _move_blocks(pool, swap_pool, pairs)
            else:
                _move_blocks(swap_pool, pool, pairs)
        else:
            raise ValueError(f"apply_block_ops: unknown op {kind!r}")


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
