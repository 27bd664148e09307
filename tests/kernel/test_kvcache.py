"""BlockManager against a brute-force reference model; prefix cache, copy-on-write, fork and swap
unit tests; KVPool/SwapPool tensors and block-op replay; memory budgets.
(The full v2 state machine with data checks is in test_kvcache_v2.py.)"""

import hashlib
import struct

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmos.errors import InvalidRequestError
from llmos.kernel import kvcache
from llmos.kernel.kvcache import BlockManager, KVPool, SwapPool, apply_block_ops, chain_hash, parse_memory_budget

PIDS = st.integers(0, 5)


class BlockManagerMachine(RuleBasedStateMachine):
    """Reference model: the tokens each pid asked for (max so far) and the blocks it was
    handed, checked against a plain set of all block ids."""

    def __init__(self):
        super().__init__()
        self.bm = None

    @rule(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4, 16]))
    @precondition(lambda self: self.bm is None)
    def init(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size)
        self.tokens: dict[int, int] = {}    # pid -> tokens covered (max requested)
        self.tables: dict[int, list[int]] = {}

    def ceil(self, n):
        return (n + self.bm.block_size - 1) // self.bm.block_size

    def num_free(self):
        return self.bm.num_blocks - sum(len(t) for t in self.tables.values())

    @rule(pid=PIDS, num_tokens=st.integers(0, 80))
    @precondition(lambda self: self.bm is not None)
    def allocate(self, pid, num_tokens):
        old = self.tables.get(pid, [])
        new_blocks = max(0, self.ceil(num_tokens) - len(old))
        expected_ok = new_blocks <= self.num_free()
        assert self.bm.can_allocate(pid, num_tokens) == expected_ok
        if not expected_ok:
            with pytest.raises(RuntimeError, match="can_allocate"):
                self.bm.allocate(pid, num_tokens)
            return
        free_before = set(self.bm.free_blocks)
        table = self.bm.allocate(pid, num_tokens)
        assert table[:len(old)] == old, "growing a table must keep its existing blocks"
        assert len(table) == max(len(old), self.ceil(num_tokens))
        assert set(table[len(old):]) <= free_before, "new blocks must come from the free queue"
        self.tables[pid] = table
        self.tokens[pid] = max(self.tokens.get(pid, 0), num_tokens)

    @rule(pid=PIDS)
    @precondition(lambda self: self.bm is not None)
    def free(self, pid):
        held = self.tables.pop(pid, [])
        self.tokens.pop(pid, None)
        self.bm.free(pid)
        assert set(held) <= set(self.bm.free_blocks)
        assert self.bm.block_table(pid) == []

    @invariant()
    def matches_reference(self):
        if self.bm is None:
            return
        self.bm.check_invariants()
        bm = self.bm
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert bm.num_free_blocks == self.num_free()
        owned = [b for t in self.tables.values() for b in t]
        assert len(owned) == len(set(owned)), "a block owned twice"
        assert set(owned) | set(bm.free_blocks) == set(range(bm.num_blocks)), "leaked block"
        assert not set(owned) & set(bm.free_blocks), "a block both free and owned"
        for pid, table in self.tables.items():
            assert bm.block_table(pid) == table
            assert len(table) == self.ceil(self.tokens[pid])
            assert all(bm.ref_counts[b] == 1 for b in table)


TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_check_invariants_catches_corruption():
    bm = BlockManager(4, block_size=2)
    bm.allocate(1, 3)
    bm.check_invariants()
    bm.free_blocks.append(bm.block_tables[1][0])  # double: free and used
    with pytest.raises(AssertionError, match="both free"):
        bm.check_invariants()
    bm = BlockManager(4, block_size=2)
    bm.allocate(1, 3)
    bm.block_tables[1].pop()  # leak
    with pytest.raises(AssertionError):
        bm.check_invariants()
    bm = BlockManager(4, block_size=2, num_swap_blocks=4)
    bm.allocate(1, 2), bm.allocate(2, 2)
    bm.swap_out(1), bm.swap_out(2)
    bm.check_invariants()
    bm.swap_tables[2][0] = bm.swap_tables[1][0]  # one swap block in two tables
    with pytest.raises(AssertionError, match="swap"):
        bm.check_invariants()
    bm = BlockManager(4, block_size=2)
    bm.allocate_prefix(1, [1, 2, 3], 3)
    bm.commit(1, [1, 2, 3], 3)
    bm.cached_blocks[bm.block_tables[1][0]] = None  # a used block also on the LRU
    with pytest.raises(AssertionError, match="cached"):
        bm.check_invariants()


def test_blocks_needed_and_free_unknown_pid():
    bm = BlockManager(8, block_size=16)
    assert [bm.blocks_needed(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]
    bm.free(123)  # no-op
    assert bm.num_free_blocks == 8 and bm.block_table(123) == []
    assert bm.allocate(7, 40) == bm.block_table(7) and len(bm.block_table(7)) == 3
    assert bm.allocate(7, 10) == bm.block_table(7)  # never shrinks
    assert len(bm.block_table(7)) == 3 and bm.num_used_blocks == 3


# ---------------------------------------------------------------- prefix cache, CoW, fork, swap

def test_lru_eviction_order_and_reverse_release():
    bm = BlockManager(6, block_size=2)
    a, b = [1, 2, 3, 4, 5], [7, 8, 9, 10, 11]
    assert bm.allocate_prefix(1, a, 5) == 0 and bm.block_table(1) == [0, 1, 2]
    bm.commit(1, a, 5)
    assert bm.allocate_prefix(2, b, 5) == 0 and bm.block_table(2) == [3, 4, 5]
    bm.commit(2, b, 5)
    bm.free(1)  # last block first: 2 (partial, no hash) to FREE, then 1, then 0 to CACHED
    bm.free(2)
    assert list(bm.cached_blocks) == [1, 0, 4, 3] and list(bm.free_blocks) == [2, 5]
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4 and bm.num_used_blocks == 0
    bm.check_invariants()
    assert bm.allocate(3, 6) == [2, 5, 1]  # FREE first, then the least recently used cached block
    assert bm.stats()["evictions"] == 1 and list(bm.cached_blocks) == [0, 4, 3]
    # block 0 ([1, 2]) still hits; block 1 ([3, 4]) was evicted; the hit leaves the LRU before 4, 3 are evicted
    assert bm.allocate_prefix(4, a, 5) == 2 and bm.block_table(4) == [0, 4, 3]
    assert bm.stats()["evictions"] == 3 and bm.num_cached_blocks == 0 and bm.num_free_blocks == 0
    # all or nothing: a hit on a USED block (shared) but no room for the rest changes nothing
    before = (list(bm.ref_counts), bm.stats())
    assert bm.allocate_prefix(5, a, 5) is None
    assert (list(bm.ref_counts), bm.stats()) == before and bm.block_table(5) == []
    bm.check_invariants()


def test_prefix_hits_counting_salt_and_hit_rate():
    bm = BlockManager(16, block_size=4)
    assert bm.stats()["hit_rate"] == 0.0
    p = list(range(10))
    assert bm.allocate_prefix(1, p, 10) == 0
    bm.commit(1, p, 10)  # blocks 0 and 1 are full of computed tokens; block 2 is not
    assert bm.stats()["prefix_queries"] == 10 and bm.stats()["prefix_hits"] == 0
    assert bm.allocate_prefix(2, p, 10) == 8
    assert bm.block_table(2)[:2] == bm.block_table(1)[:2] and bm.block_table(2)[2] != bm.block_table(1)[2]
    assert [bm.ref_counts[b] for b in bm.block_table(1)] == [2, 2, 1]
    assert bm.allocate_prefix(3, p[:8], 8) == 4  # the last token is always left to compute
    assert len(bm.block_table(3)) == 2 and bm.block_table(3)[0] == bm.block_table(1)[0]
    assert bm.allocate_prefix(4, p, 10, salt="bob") == 0  # another owner never shares
    assert bm.allocate_prefix(5, [99] + p[1:], 10) == 0  # chain hash: a different first block misses all
    assert bm.allocate_prefix(6, p[:3] + [77] + p[4:], 10) == 0
    s = bm.stats()
    assert s["prefix_queries"] == 58 and s["prefix_hits"] == 12 and s["hit_rate"] == pytest.approx(12 / 58)
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate_prefix(1, p, 10)
    bm.check_invariants()


def test_chain_hash_scheme_and_duplicate_commit():
    bm = BlockManager(8, block_size=2)
    toks = [3, 1, 4, 1, 5]
    bm.allocate(1, 5)
    bm.commit(1, toks, 4, salt="alice")
    h0 = hashlib.blake2b(b"alice" + struct.pack("<2q", 3, 1), digest_size=16).digest()
    h1 = hashlib.blake2b(h0 + b"alice" + struct.pack("<2q", 4, 1), digest_size=16).digest()
    t1 = bm.block_table(1)
    assert [bm.block_hashes[b] for b in t1] == [h0, h1, None] and chain_hash(h0, "alice", [4, 1]) == h1
    assert bm.hash_to_block == {h0: t1[0], h1: t1[1]}
    bm.allocate(2, 5)  # the same content computed again without a hit: stays unhashed, no duplicate
    bm.commit(2, toks, 5, salt="alice")
    assert all(bm.block_hashes[b] is None for b in bm.block_table(2)) and len(bm.hash_to_block) == 2
    with pytest.raises(ValueError, match="computed tokens"):
        bm.commit(2, toks, 7, salt="alice")
    bm.check_invariants()


def test_cow_on_first_write_into_shared_partial_block():
    bm = BlockManager(8, block_size=4)
    assert bm.allocate(1, 6) == [0, 1]  # 6 computed tokens: block 1 is partial
    bm.fork(1, 2)
    assert bm.allocate(2, 7) == [0, 1] and bm.take_ops() == []  # no write_from: the old meaning, no copy
    assert bm.can_allocate(2, 7, write_from=6)
    assert bm.allocate(2, 7, write_from=6) == [0, 2]
    assert bm.take_ops() == [("copy", [(1, 2)])] and bm.take_ops() == []
    assert [bm.ref_counts[b] for b in (0, 1, 2)] == [2, 1, 1]
    assert bm.allocate(1, 7, write_from=6) == [0, 1] and bm.take_ops() == []  # block 1 is the parent's alone now
    bm.check_invariants()
    bm = BlockManager(2, block_size=4)
    bm.allocate(1, 6)
    bm.fork(1, 2)
    assert not bm.can_allocate(2, 7, write_from=6)  # the copy needs a block
    assert bm.can_allocate(2, 7) and bm.can_allocate(2, 8, write_from=8)
    with pytest.raises(RuntimeError, match="can_allocate"):
        bm.allocate(2, 7, write_from=6)
    bm.check_invariants()


def test_write_into_hashed_block_is_refused():
    bm = BlockManager(4, block_size=2)
    bm.allocate(1, 4)
    bm.commit(1, [1, 2, 3, 4], 4)
    with pytest.raises(AssertionError, match="cached block"):
        bm.allocate(1, 5, write_from=3)
    bm.allocate(1, 5, write_from=4)


def test_fork_refcounts_and_misuse():
    bm = BlockManager(8, block_size=2, num_swap_blocks=4)
    bm.allocate(1, 5)
    bm.commit(1, [1, 2, 3, 4, 5], 4)
    bm.fork(1, 2)
    bm.fork(2, 3)
    assert bm.block_table(3) == bm.block_table(1) and all(bm.ref_counts[b] == 3 for b in bm.block_table(1))
    assert bm.chain_hashes[3] == bm.chain_hashes[1] and len(bm.chain_hashes[3]) == 2
    bm.check_invariants()
    for parent, child in [(1, 1), (9, 4), (1, 2)]:  # itself, unknown parent, child holds blocks
        with pytest.raises(ValueError):
            bm.fork(parent, child)
    bm.swap_out(3)
    for parent, child in [(3, 4), (1, 3)]:  # swapped parent, swapped child
        with pytest.raises(ValueError):
            bm.fork(parent, child)
    bm.free(1)
    assert all(bm.ref_counts[b] == 1 for b in bm.block_table(2)) and bm.num_used_blocks == 3
    bm.free(2)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2
    bm.free(3)
    assert bm.num_free_swap_blocks == 4
    bm.check_invariants()


def test_swap_budget_refusal_and_round_trip():
    bm = BlockManager(4, block_size=2, num_swap_blocks=2)
    assert bm.allocate(1, 5) == [0, 1, 2]
    assert not bm.can_swap_out(1)  # 3 blocks, 2 swap blocks
    with pytest.raises(RuntimeError, match="can_swap_out"):
        bm.swap_out(1)
    assert bm.allocate(2, 1) == [3]
    assert bm.can_swap_out(2) and bm.swap_out(2) == [(3, 0)]
    assert bm.is_swapped(2) and bm.num_swapped_blocks(2) == 1 and bm.num_resident_blocks(2) == 0
    assert bm.num_free_swap_blocks == 1 and bm.num_free_blocks == 1
    assert not bm.can_swap_out(2) and not bm.can_allocate(2, 1)
    for fn in (bm.swap_out, lambda pid: bm.allocate(pid, 1), lambda pid: bm.commit(pid, [1], 1)):
        with pytest.raises(ValueError):
            fn(2)
    bm.allocate(3, 2)  # the device is full
    assert not bm.can_swap_in(2)
    with pytest.raises(RuntimeError, match="can_swap_in"):
        bm.swap_in(2)
    bm.free(3)
    assert bm.can_swap_in(2) and not bm.can_swap_in(2, num_tokens=3)
    assert bm.swap_in(2) == [3] and not bm.is_swapped(2) and bm.num_free_swap_blocks == 2
    assert bm.take_ops() == [("swap_out", [(3, 0)]), ("swap_in", [(0, 3)])]
    for fn in (bm.swap_in, bm.drop_swapped):
        with pytest.raises(ValueError, match="not swapped"):
            fn(2)
    assert not bm.can_swap_in(2) and not BlockManager(4, 2).can_swap_out(1)
    bm.free(2)
    assert bm.stats()["used_swap_blocks"] == 0 and bm.stats()["free_swap_blocks"] == 2
    bm.check_invariants()


def test_swap_out_keeps_shared_and_cached_blocks_then_swap_in_grows():
    bm = BlockManager(8, block_size=2, num_swap_blocks=8)
    toks = [1, 2, 3, 4, 5]
    bm.allocate(1, 5)
    bm.commit(1, toks, 5)
    bm.fork(1, 2)
    t1 = bm.block_table(1)
    pairs = bm.swap_out(1)
    assert [d for d, _ in pairs] == t1 and bm.block_table(2) == t1  # shared blocks stay with pid 2
    assert all(bm.ref_counts[b] == 1 for b in t1) and bm.num_cached_blocks == 0
    bm.free(2)
    assert bm.num_cached_blocks == 2  # the two hashed blocks are still findable
    table = bm.swap_in(1, num_tokens=8)
    assert len(table) == 4 and not set(table) & set(bm.cached_blocks)  # FREE ones first
    assert all(bm.block_hashes[b] is None for b in table)
    bm.commit(1, toks, 5)  # the same hashes are registered to the cached blocks: these stay unhashed
    assert all(bm.block_hashes[b] is None for b in table) and len(bm.hash_to_block) == 2
    bm.check_invariants()
    bm.swap_out(1)
    bm.drop_swapped(1)
    assert bm.num_free_swap_blocks == 8 and 1 not in bm.chain_hashes
    assert bm.allocate_prefix(1, toks, 5) == 4  # recompute: the cached prefix hits
    bm.check_invariants()


def test_prefix_cache_disabled():
    bm = BlockManager(4, block_size=2, enable_prefix_cache=False)
    toks = [1, 2, 3, 4, 5]
    assert bm.allocate_prefix(1, toks, 5) == 0 and len(bm.block_table(1)) == 3
    bm.commit(1, toks, 5)
    assert bm.hash_to_block == {} and bm.allocate_prefix(2, toks, 5) is None
    bm.free(1)
    assert bm.num_cached_blocks == 0 and len(bm.free_blocks) == 4
    assert bm.allocate_prefix(2, toks, 5) == 0
    s = bm.stats()
    assert s["prefix_queries"] == s["prefix_hits"] == 0 and s["hit_rate"] == 0.0 and s["cached_blocks"] == 0
    bm.check_invariants()


# ---------------------------------------------------------------- tensors

def _pattern(pool, n):
    return torch.arange(pool.num_layers * 2 * n * pool.block_size * pool.num_kv_heads * pool.head_dim,
                        dtype=torch.float32).view(pool.num_layers, 2, n, pool.block_size, pool.num_kv_heads,
                                                  pool.head_dim)


def test_kvpool_copy_read_write_blocks():
    pool = KVPool(num_layers=2, num_kv_heads=2, head_dim=3, num_blocks=5, block_size=4)
    data = _pattern(pool, 5)
    pool.write_blocks(range(5), data)
    assert torch.equal(pool.kv_caches[1][1][3], data[1, 1, 3])  # layer 1, V, block 3
    got = pool.read_blocks([4, 0])
    assert got.shape == (2, 2, 2, 4, 2, 3) and got.device.type == "cpu"
    assert torch.equal(got, data[:, :, [4, 0]])
    pool.copy_blocks([(0, 3), (1, 4), (2, 0)])  # all sources read before any destination is written
    assert torch.equal(pool.read_blocks([3, 4, 0]), data[:, :, [0, 1, 2]])
    pool.copy_blocks([])
    with pytest.raises(ValueError, match="shape"):
        pool.write_blocks([0], data)


def test_swap_pool_layout():
    swap = SwapPool(num_layers=3, num_kv_heads=2, head_dim=8, num_swap_blocks=4, block_size=4, dtype=torch.float16)
    assert len(swap.kv_caches) == 3 and swap.num_swap_blocks == 4
    for k, v in swap.kv_caches:
        assert k.shape == v.shape == (4, 4, 2, 8) and k.device.type == "cpu" and k.dtype == torch.float16
    assert swap.nbytes == 4 * KVPool.bytes_per_block(3, 2, 8, 4, torch.float16)
    empty = SwapPool(1, 1, 1, 0, 16)
    assert empty.nbytes == 0 and empty.read_blocks([]).shape == (1, 2, 0, 16, 1, 1)


def test_apply_block_ops_in_order_with_a_freed_block_reused():
    """pid 1's block 0 is swapped out, then freed and reused as the copy-on-write destination of
    pid 3 in the same log: only in-order replay leaves A in swap and B in block 0."""
    bm = BlockManager(2, block_size=2, num_swap_blocks=2)
    pool, swap = KVPool(2, 1, 2, 2, 2), SwapPool(2, 1, 2, 2, 2)
    bm.allocate(1, 2), bm.allocate(2, 1)
    bm.fork(2, 3)
    a, b = _pattern(pool, 1), _pattern(pool, 1) + 100
    pool.write_blocks([0], a)
    pool.write_blocks([1], b)
    assert bm.swap_out(1) == [(0, 0)]
    assert bm.allocate(3, 2, write_from=1) == [0]
    ops = bm.take_ops()
    assert ops == [("swap_out", [(0, 0)]), ("copy", [(1, 0)])]
    apply_block_ops(ops, pool, swap)
    assert torch.equal(swap.read_blocks([0]), a) and torch.equal(pool.read_blocks([0, 1]), torch.cat([b, b], 2))
    bm.free(3)
    assert bm.swap_in(1) == [0]
    apply_block_ops(bm.take_ops(), pool, swap)
    assert torch.equal(pool.read_blocks([0]), a)
    with pytest.raises(ValueError, match="swap pool"):
        apply_block_ops([("swap_in", [(0, 0)])], pool, None)
    with pytest.raises(ValueError, match="unknown"):
        apply_block_ops([("move", [(0, 0)])], pool, swap)


def test_kvpool_shapes_and_bytes():
    pool = KVPool(num_layers=3, num_kv_heads=2, head_dim=8, num_blocks=5, block_size=4, dtype=torch.float16)
    assert len(pool.kv_caches) == 3
    for k, v in pool.kv_caches:
        assert k.shape == v.shape == (5, 4, 2, 8)
        assert k.dtype == torch.float16 and k.is_contiguous() and v.is_contiguous()
        assert k.data_ptr() != v.data_ptr()
    assert len({t.data_ptr() for kv in pool.kv_caches for t in kv}) == 6  # no two caches alias
    per_block = KVPool.bytes_per_block(3, 2, 8, 4, torch.float16)
    assert per_block == 2 * 3 * 4 * 2 * 8 * 2
    assert pool.nbytes == 5 * per_block
    assert KVPool.bytes_per_block(1, 1, 1, 16, torch.float32) == 2 * 16 * 4
    assert KVPool.num_blocks_for_budget(10 * per_block + per_block - 1, per_block) == 10
    assert KVPool.num_blocks_for_budget(per_block - 1, per_block) == 0


@pytest.mark.parametrize("value, expected", [
    (1024, 1024), ("1024", 1024), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000),
    ("800M", 800 * 2**20), ("800m", 800 * 2**20), (" 4 KiB ", 4096), ("3k", 3072), ("10KB", 10_000),
    ("1Gi", 2**30), ("2TB", 2 * 10**12), (4e9, 4_000_000_000), ("16B", 16),
])
def test_parse_memory_budget_sizes(value, expected):
    assert parse_memory_budget(value, "cpu") == expected


@pytest.mark.parametrize("value, fraction", [(0.5, 0.5), (1.0, 1.0), ("0.25", 0.25), ("90%", 0.9), ("1.0", 1.0)])
def test_parse_memory_budget_fraction(monkeypatch, value, fraction):
    monkeypatch.setattr(kvcache, "free_memory_bytes", lambda device: 1_000_000)
    assert parse_memory_budget(value, "cpu") == int(fraction * 1_000_000)


@pytest.mark.parametrize("value", [0, -5, 0.0, -0.5, 1.5, float("nan"), float("inf"), True, None, "", "abc",
                                   "12XB", "-1GiB", "0MiB", "150%", "0%", "1.5", "GiB", [1]])
def test_parse_memory_budget_rejects(value):
    with pytest.raises(InvalidRequestError, match="512MiB"):
        parse_memory_budget(value, "cpu")


def test_free_memory_cpu_is_positive():
    assert kvcache.free_memory_bytes("cpu") > 0
    assert 0 < parse_memory_budget(0.01, "cpu") <= kvcache.free_memory_bytes("cpu")
