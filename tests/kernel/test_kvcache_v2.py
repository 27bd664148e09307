"""BlockManager v2 (copy-on-write, prefix cache, swap) against a brute-force reference model,
with real KVPool/SwapPool tensors proving that the logged block ops move the right data."""

import copy
import hashlib

import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llmos.kernel.kvcache import BlockManager, KVPool, SwapPool, apply_block_ops

SALTS = ["alice", "bob"]  # two owners: never share blocks
BASES = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [5, 6, 7, 8, 1, 2, 3, 4, 9, 9, 9, 9], [21, 22, 23, 24, 25, 26]]
MAX_LIVE = 7
LAYERS, HEADS, HEAD_DIM = 2, 1, 2
# value written at (layer, K/V): content id + an offset, exact in float32
OFFSETS = torch.tensor([[0.0, 0.25], [0.5, 0.75]]).view(LAYERS, 2, 1, 1, 1)


def ref_hash(salt, tokens, bs, i):
    """Chain hash of block i, recomputed from scratch (independent of kvcache.chain_hash)."""
    h = b""
    for j in range(i + 1):
        block = tokens[j * bs:(j + 1) * bs]
        h = hashlib.blake2b(h + salt.encode() + b"".join(t.to_bytes(8, "little", signed=True) for t in block),
                            digest_size=16).digest()
    return h


class Proc:
    def __init__(self, salt, tokens):
        self.salt, self.tokens, self.computed, self.state = salt, list(tokens), 0, "waiting"


class KVMachine(RuleBasedStateMachine):
    """The reference: per-pid tables and swap tables, a dict content -> registered block and an
    LRU list, all recomputed by brute force; the manager must match it exactly (same tables,
    same LRU order, same hits) and the tensors must hold every pid's expected values."""

    @initialize(num_blocks=st.integers(3, 16), bs=st.sampled_from([1, 2, 4]), num_swap=st.integers(0, 8),
                 cache=st.sampled_from([True, True, True, False]))
    def init(self, num_blocks, bs, num_swap, cache):
        self.bm = BlockManager(num_blocks, bs, num_swap_blocks=num_swap, enable_prefix_cache=cache)
        self.bs, self.cache = bs, cache
        self.pool = KVPool(LAYERS, HEADS, HEAD_DIM, num_blocks, bs)
        self.swap_pool = SwapPool(LAYERS, HEADS, HEAD_DIM, num_swap, bs)
        self.pending = []  # ops taken from the manager, not yet replayed on the real tensors
        self.procs: dict[int, Proc] = {}
        self.next_pid = 1
        self.tables: dict[int, list[int]] = {}  # resident pids (reference)
        self.swaps: dict[int, list[int]] = {}
        self.registered: dict[tuple, int] = {}  # (salt, token prefix) of a full block -> block
        self.lru: list[int] = []  # CACHED blocks, least recently released first
        self.committed: dict[int, int] = {}
        self.queries = self.hits = 0
        self.content_ids: dict[tuple, int] = {}

    # ---- reference helpers ----------------------------------------------------------------------

    def ceil(self, n):
        return -(-n // self.bs)

    def refcount(self, block):
        return sum(t.count(block) for t in self.tables.values())

    def used(self):
        return {b for t in self.tables.values() for b in t}

    def num_free(self):
        return self.bm.num_blocks - len(self.used())

    def acquire(self, k):
        """Blocks the manager may hand out for k new blocks: FREE ones first, then the k - |FREE|
        least recently used cached ones, which lose their registration. Returns (allowed, exact)."""
        free = set(range(self.bm.num_blocks)) - self.used() - set(self.lru)
        if k <= len(free):
            return free, False
        evicted, self.lru = self.lru[:k - len(free)], self.lru[k - len(free):]
        self.registered = {key: b for key, b in self.registered.items() if b not in evicted}
        return free | set(evicted), True

    def check_acquired(self, got, allowed_exact):
        allowed, exact = allowed_exact
        assert len(set(got)) == len(got)
        assert set(got) <= allowed, f"new blocks {got} not from FREE/LRU {allowed}"
        if exact:
            assert set(got) == allowed, "eviction must take all FREE blocks, then the LRU ones"

    def release(self, table):
        reg = set(self.registered.values())
        for b in reversed(table):
            if self.refcount(b) == 0 and b in reg:
                self.lru.append(b)

    def key(self, p, i):
        return (p.salt, tuple(p.tokens[:(i + 1) * self.bs]))

    def ref_commit(self, pid):
        p, table = self.procs[pid], self.tables[pid]
        if not self.cache:
            return
        reg = set(self.registered.values())
        for i in range(self.committed.get(pid, 0), p.computed // self.bs):
            if table[i] not in reg and self.key(p, i) not in self.registered:
                self.registered[self.key(p, i)] = table[i]
                reg.add(table[i])
        self.committed[pid] = max(self.committed.get(pid, 0), p.computed // self.bs)

    def value_ids(self, p, n):
        out = []
        for t in range(n):
            key = (p.salt, tuple(p.tokens[:t + 1]))
            out.append(self.content_ids.setdefault(key, len(self.content_ids) + 1))
        return torch.tensor(out, dtype=torch.float32)

    def take(self):
        ops = self.bm.take_ops()
        self.pending.extend(ops)
        return ops

    def pick(self, state, i):
        pids = sorted(pid for pid, p in self.procs.items() if p.state == state)
        return pids[i % len(pids)]

    def has(self, state):
        return any(p.state == state for p in self.procs.values())

    # ---- rules --------------------------------------------------------------------------------------

    @precondition(lambda self: len(self.procs) < MAX_LIVE)
    @rule(owner=st.integers(0, 1), base=st.integers(0, len(BASES) - 1), cut=st.integers(1, 12),
          tail=st.lists(st.integers(1, 2), max_size=3))
    def spawn(self, owner, base, cut, tail):
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        self.procs[pid] = Proc(SALTS[owner], BASES[base][:cut] + tail)
        self.admit(pid)

    def admit(self, pid):
        """allocate_prefix for a waiting pid, checked against the reference lookup."""
        p, bs = self.procs[pid], self.bs
        hits = []
        if self.cache:
            for i in range((len(p.tokens) - 1) // bs):
                if self.key(p, i) not in self.registered:
                    break
                hits.append(self.registered[self.key(p, i)])
        need = self.ceil(max(len(p.tokens), len(hits) * bs + 1) if hits else len(p.tokens)) - len(hits)
        fits = need <= self.num_free() - sum(b in self.lru for b in hits)
        got = self.bm.allocate_prefix(pid, p.tokens, len(p.tokens), p.salt)
        if not fits:
            assert got is None
            return
        assert got == len(hits) * bs, f"hit {got} tokens, reference {len(hits) * bs}"
        self.lru = [b for b in self.lru if b not in hits]
        self.tables[pid] = hits  # attached before the new blocks are taken
        expect = self.acquire(need)
        table = self.bm.block_table(pid)
        assert table[:len(hits)] == hits
        self.check_acquired(table[len(hits):], expect)
        assert self.take() == []
        self.tables[pid], p.computed, p.state = table, got, "resident"
        self.committed[pid] = len(hits)
        if self.cache:
            self.queries += len(p.tokens)
            self.hits += got

    @precondition(lambda self: self.has("waiting"))
    @rule(i=st.integers(0, 100))
    def admit_waiting(self, i):
        self.admit(self.pick("waiting", i))

    @precondition(lambda self: self.has("resident"))
    @rule(i=st.integers(0, 100), new=st.lists(st.integers(1, 3), max_size=3), chunk=st.integers(1, 6))
    def step(self, i, new, chunk):
        """Append tokens and compute a chunk: allocate with copy-on-write, replay, write, commit."""
        pid = self.pick("resident", i)
        p, table = self.procs[pid], self.tables[pid]
        p.tokens += new
        target = min(len(p.tokens), p.computed + chunk)
        end = min(len(table), self.ceil(target))
        cow = [j for j in range(p.computed // self.bs, end) if self.refcount(table[j]) > 1]
        grow = max(0, self.ceil(target) - len(table))
        ok = grow + len(cow) <= self.num_free()
        assert self.bm.can_allocate(pid, target, write_from=p.computed) == ok
        if not ok:
            return
        expect = self.acquire(grow + len(cow))
        got = self.bm.allocate(pid, target, write_from=p.computed)
        assert len(got) == len(table) + grow
        kept = [j for j in range(len(table)) if j not in cow]
        assert [got[j] for j in kept] == [table[j] for j in kept], "only shared written blocks are replaced"
        fresh = [got[j] for j in cow] + got[len(table):]
        self.check_acquired(fresh, expect)
        assert self.take() == ([("copy", [(table[j], got[j]) for j in cow])] if cow else [])
        self.tables[pid] = got
        # the runner: replay every pending op, then the forward pass writes the new tokens' K/V
        apply_block_ops(self.pending, self.pool, self.swap_pool)
        self.pending = []
        vals = self.value_ids(p, target)[p.computed:]
        pos = torch.arange(p.computed, target)
        slots = torch.tensor(got)[pos // self.bs] * self.bs + pos % self.bs
        for layer, (k, v) in enumerate(self.pool.kv_caches):
            for kv, t in enumerate((k, v)):
                t.view(-1, HEADS, HEAD_DIM)[slots] = (vals + OFFSETS[layer, kv, 0, 0, 0]).view(-1, 1, 1)
        p.computed = target
        self.bm.commit(pid, p.tokens, p.computed, p.salt)
        self.ref_commit(pid)

    @precondition(lambda self: self.has("resident") and len(self.procs) < MAX_LIVE)
    @rule(i=st.integers(0, 100))
    def fork(self, i):
        parent = self.pick("resident", i)
        child, self.next_pid = self.next_pid, self.next_pid + 1
        q = self.procs[parent]
        c = self.procs[child] = Proc(q.salt, q.tokens)
        c.computed, c.state = q.computed, "resident"
        self.bm.fork(parent, child)
        self.tables[child] = list(self.tables[parent])
        self.committed[child] = self.committed.get(parent, 0)

    @precondition(lambda self: self.has("resident"))
    @rule(i=st.integers(0, 100))
    def suspend(self, i):
        """Swap out; when swap is full, drop the blocks instead (preemption by recompute)."""
        pid = self.pick("resident", i)
        p, table = self.procs[pid], self.tables[pid]
        ok = len(table) <= self.bm.num_swap_blocks - sum(map(len, self.swaps.values()))
        assert self.bm.can_swap_out(pid) == ok
        if ok:
            free_swap = set(range(self.bm.num_swap_blocks)) - {s for t in self.swaps.values() for s in t}
            pairs = self.bm.swap_out(pid)
            assert [d for d, _ in pairs] == table and {s for _, s in pairs} <= free_swap
            assert self.take() == [("swap_out", pairs)]
            self.swaps[pid] = [s for _, s in pairs]
            p.state = "swapped"
            self.committed[pid] = 0
        else:
            self.bm.free(pid)
            p.state, p.computed = "waiting", 0
            self.committed.pop(pid, None)
        del self.tables[pid]
        self.release(table)

    @precondition(lambda self: self.has("swapped"))
    @rule(i=st.integers(0, 100), recompute=st.booleans(), cover_all=st.booleans())
    def resume(self, i, recompute, cover_all):
        pid = self.pick("swapped", i)
        p = self.procs[pid]
        if recompute:
            self.bm.drop_swapped(pid)
            del self.swaps[pid]
            p.state, p.computed = "waiting", 0
            self.committed.pop(pid, None)
            self.admit(pid)
            return
        num_tokens = len(p.tokens) if cover_all else 0
        need = max(len(self.swaps[pid]), self.ceil(num_tokens))
        ok = need <= self.num_free()
        assert self.bm.can_swap_in(pid, num_tokens) == ok
        if not ok:
            return
        expect = self.acquire(need)
        table = self.bm.swap_in(pid, num_tokens)
        assert len(table) == need
        self.check_acquired(table, expect)
        assert self.take() == [("swap_in", list(zip(self.swaps.pop(pid), table)))]
        self.tables[pid], p.state = table, "resident"
        self.committed[pid] = 0

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 100))
    def kill(self, i):
        pid = sorted(self.procs)[i % len(self.procs)]
        self.bm.free(pid)
        self.procs.pop(pid)
        self.swaps.pop(pid, None)
        self.committed.pop(pid, None)
        table = self.tables.pop(pid, [])
        self.release(table)

    # ---- invariants ---------------------------------------------------------------------------------

    @invariant()
    def accounting_matches_reference(self):
        bm = self.bm
        bm.check_invariants()
        used = self.used()
        assert bm.num_used_blocks == len(used) and bm.num_free_blocks == bm.num_blocks - len(used)
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert list(bm.cached_blocks) == self.lru, "LRU order differs from the reference"
        assert bm.num_cached_blocks == len(self.lru)
        assert all(bm.ref_counts[b] == self.refcount(b) for b in range(bm.num_blocks)), "ref count != live refs"
        assert bm.num_free_swap_blocks == bm.num_swap_blocks - sum(map(len, self.swaps.values()))
        for pid, p in self.procs.items():
            assert bm.block_table(pid) == self.tables.get(pid, [])
            assert bm.is_swapped(pid) == (p.state == "swapped")
            assert bm.swap_tables.get(pid) == self.swaps.get(pid)
            assert bm.num_resident_blocks(pid) == len(self.tables.get(pid, []))
            assert bm.num_swapped_blocks(pid) == len(self.swaps.get(pid, []))
            if p.state == "resident":
                assert len(self.tables[pid]) >= self.ceil(p.computed)
        assert set(bm.hash_to_block.values()) == set(self.registered.values())
        for (salt, prefix), b in self.registered.items():
            assert bm.block_hashes[b] == ref_hash(salt, prefix, self.bs, len(prefix) // self.bs - 1)
        s = bm.stats()
        assert (s["prefix_queries"], s["prefix_hits"], s["evictions"] >= 0) == (self.queries, self.hits, True)
        assert s["hit_rate"] == (self.hits / self.queries if self.queries else 0.0)

    @invariant()
    def data_reads_back(self):
        """Replay the pending ops on a copy of the tensors (as the runner would before the next
        forward pass): every pid's computed tokens must read back their own content's values,
        from the device if resident, from swap if swapped out. Shared blocks (fork, prefix hits)
        pass only if they hold the same tokens under the same salt."""
        pool, swap_pool = copy.copy(self.pool), copy.copy(self.swap_pool)
        pool.kv_caches = [(k.clone(), v.clone()) for k, v in self.pool.kv_caches]
        swap_pool.kv_caches = [(k.clone(), v.clone()) for k, v in self.swap_pool.kv_caches]
        apply_block_ops(self.pending, pool, swap_pool)
        for pid, p in self.procs.items():
            if p.state == "waiting" or p.computed == 0:
                continue
            store, table = (pool, self.tables[pid]) if p.state == "resident" else (swap_pool, self.swaps[pid])
            data = store.read_blocks(table)  # [layers, 2, n, bs, heads, head_dim]
            got = data.flatten(2, 3)[:, :, :p.computed]
            want = (self.value_ids(p, p.computed).view(1, 1, -1, 1, 1) + OFFSETS.view(LAYERS, 2, 1, 1, 1))
            assert torch.equal(got, want.expand_as(got)), f"pid {pid} ({p.state}) reads back wrong K/V"


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=400, stateful_step_count=50, deadline=None)
