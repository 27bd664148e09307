"""BlockManager against a brute-force reference model; KVPool sizes; memory budgets."""

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmos.errors import InvalidRequestError
from llmos.kernel import kvcache
from llmos.kernel.kvcache import BlockManager, KVPool, parse_memory_budget

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


def test_blocks_needed_and_free_unknown_pid():
    bm = BlockManager(8, block_size=16)
    assert [bm.blocks_needed(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]
    bm.free(123)  # no-op
    assert bm.num_free_blocks == 8 and bm.block_table(123) == []
    assert bm.allocate(7, 40) == bm.block_table(7) and len(bm.block_table(7)) == 3
    assert bm.allocate(7, 10) == bm.block_table(7)  # never shrinks
    assert len(bm.block_table(7)) == 3 and bm.num_used_blocks == 3


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
