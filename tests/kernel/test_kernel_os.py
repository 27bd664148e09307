"""The kernel as an operating system (issue 3) on a tiny model: prefix cache, fork, swap, suspend,
hibernate, policies and limits, each checked against an independent oracle (a straight run of the same
tokens), plus a randomized stress test of every syscall with the accounting checked after every step."""

import random
import time

import pytest
import torch

from llmos.errors import (HibernationError, InvalidRequestError, OutOfBlocksError, ProcessNotFoundError,
                          QuotaExceededError)
from llmos.kernel import syscalls
from llmos.kernel.hibernate import HibernationStore
from llmos.kernel.kernel import Kernel, KernelConfig
from llmos.kernel.kvcache import KVPool
from llmos.kernel.proc import ProcState
from llmos.model.sampling import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def pool_bytes(num_blocks, block_size=16):
    """A KV budget of exactly `num_blocks` blocks for the tiny model (2 layers, 2 KV heads of 16)."""
    return num_blocks * KVPool.bytes_per_block(2, 2, 16, block_size, torch.float32)


def ids(n, seed, vocab=300):
    rng = random.Random(seed)
    return [rng.randrange(2, vocab) for _ in range(n)]


def make(tiny_model_dir, tmp_path, **kw):
    kw.setdefault("kv_memory", "64MiB")
    kw.setdefault("max_num_batched_tokens", 256)
    return Kernel(tiny_model_dir, KernelConfig(hibernate_dir=str(tmp_path), **kw))


def check(k: Kernel):
    """Accounting: the block manager's invariants, and who holds what matches process states."""
    bm = k.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    for p in k.processes.values():
        if p.is_finished:
            assert bm.num_resident_blocks(p.pid) == 0 and not bm.is_swapped(p.pid), f"{p} holds blocks"
        if p.state is ProcState.RUNNING:
            assert bm.num_resident_blocks(p.pid) > 0 and not bm.is_swapped(p.pid)
        if bm.is_swapped(p.pid):
            assert p.state in (ProcState.READY, ProcState.SUSPENDED) and p.num_computed_tokens > 0


def straight(tiny_model_dir, tmp_path, prompt, params):
    """The oracle: the same request alone, no preemption, no cache, no fork."""
    k = make(tiny_model_dir, tmp_path / "straight", enable_prefix_cache=False)
    return syscalls.wait(k, syscalls.spawn(k, prompt, params)).token_ids


# ---- prefix cache ------------------------------------------------------------------------------


def test_prefix_cache_hits_same_outputs_and_owner_isolation(tiny_model_dir, tmp_path):
    system = ids(70, seed=1)
    questions = [ids(9, seed=10 + i) for i in range(4)]
    params = SamplingParams(max_tokens=12, **GREEDY)
    off = make(tiny_model_dir, tmp_path, enable_prefix_cache=False)
    on = make(tiny_model_dir, tmp_path)
    expected = [syscalls.wait(off, syscalls.spawn(off, system + q, params)).token_ids for q in questions]
    got = []
    for q in questions:
        p = on.spawn(system + q, params, owner="alice")
        on.run_until_done([p.pid])
        got.append(p.output_token_ids)
        check(on)
    assert got == expected
    stats = on.memory()["prefix_cache"]
    # 70 shared tokens = 4 full blocks of 16; requests 2-4 reuse them.
    assert stats["prefix_hits"] == 3 * 64
    assert 0 < stats["hit_rate"] < 1
    assert on.memory()["cached_blocks"] > 0
    # Another owner's identical prompt never reuses alice's blocks (the cache salt is the owner).
    p = on.spawn(system + questions[0], params, owner="bob")
    on.run_until_done([p.pid])
    assert on.memory()["prefix_cache"]["prefix_hits"] == 3 * 64
    assert p.output_token_ids == expected[0]


def test_prefix_cache_eviction_under_pressure_keeps_outputs(tiny_model_dir, tmp_path):
    params = SamplingParams(max_tokens=8, **GREEDY)
    k = make(tiny_model_dir, tmp_path, kv_memory=pool_bytes(12))
    prompts = [ids(60, seed=s) for s in range(6)]
    for prompt in prompts:
        p = k.spawn(prompt, params)
        k.run_until_done([p.pid])
        assert p.output_token_ids == straight(tiny_model_dir, tmp_path, prompt, params)
        check(k)
    assert k.memory()["prefix_cache"]["evictions"] > 0


# ---- fork and parallel sampling ---------------------------------------------------------------


def test_fork_children_continue_like_a_fresh_process_and_share_blocks(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path)
    prompt = ids(50, seed=3)
    parent = k.spawn(prompt, SamplingParams(max_tokens=30, temperature=0.9, seed=7, ignore_eos=True))
    for _ in range(6):
        k.step()
    assert parent.state is ProcState.RUNNING and parent.num_output_tokens > 0
    used_before = k.block_manager.num_used_blocks
    at_fork = list(parent.token_ids)
    children = k.fork(parent.pid, 3)
    assert k.block_manager.num_used_blocks == used_before, "a fork shares every block"
    assert [c.parent for c in children] == [parent.pid] * 3
    while k.has_work():
        k.step()
        check(k)
    for c in children:
        assert c.token_ids[:len(at_fork)] == at_fork
        # Oracle: a fresh process whose prompt is the parent's tokens at the fork and whose seed is the child's.
        fresh = straight(tiny_model_dir, tmp_path, at_fork[:len(prompt)] + at_fork[len(prompt):],
                         SamplingParams(max_tokens=30 - (len(at_fork) - len(prompt)), temperature=0.9,
                                        seed=c.params.seed, ignore_eos=True))
        assert c.output_token_ids[len(at_fork) - len(prompt):] == fresh
    assert len({tuple(c.output_token_ids) for c in children}) > 1, "children sample independently"


def test_parallel_sampling_n_uses_fork_and_matches_oracle(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path, enable_prefix_cache=False)
    prompt = ids(100, seed=4)
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)
    parent = k.spawn(prompt, params, n=4)
    peak = 0
    while k.has_work():
        k.step()
        check(k)
        peak = max(peak, k.block_manager.num_used_blocks)
    kids = [k.processes[pid] for pid in k.children(parent.pid)]
    assert len(kids) == 3
    # 100 prompt tokens = 7 blocks shared; 4 independent processes would hold 4 x 7.
    assert peak <= 7 + 4 * 2
    assert parent.output_token_ids == straight(tiny_model_dir, tmp_path, prompt, params)
    for c in kids:
        assert c.output_token_ids == straight(tiny_model_dir, tmp_path, prompt, c.params)
        assert c.num_output_tokens == 10


def test_fork_errors(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path, max_processes_per_owner=3)
    p = k.spawn(ids(10, 1), SamplingParams(max_tokens=4, **GREEDY))
    with pytest.raises(InvalidRequestError, match="n from 1 to 64"):
        k.fork(p.pid, 0)
    with pytest.raises(QuotaExceededError, match="limit is 3"):
        k.fork(p.pid, 3)
    with pytest.raises(ProcessNotFoundError):
        k.fork(p.pid, 1, owner="mallory")
    k.run_until_done()
    with pytest.raises(InvalidRequestError, match="has ended"):
        k.fork(p.pid, 1)


# ---- swap, suspend, hibernate: the same tokens whatever happens ---------------------------------


SPECS = [(ids(40, 20), SamplingParams(max_tokens=40, **GREEDY)),
         (ids(25, 21), SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)),
         (ids(60, 22), SamplingParams(max_tokens=30, temperature=1.2, top_k=40, seed=6, ignore_eos=True))]


@pytest.mark.parametrize("seed", range(4))
def test_same_tokens_through_preemption_swap_suspend_hibernate(tiny_model_dir, tmp_path, seed):
    """ARCHITECTURE.md invariant: a greedy or seeded process yields exactly the same tokens whether it ran
    straight through or was preempted, swapped, suspended, hibernated and resumed (in a new kernel) at random steps."""
    expected = [straight(tiny_model_dir, tmp_path, prompt, params) for prompt, params in SPECS]
    rng = random.Random(seed)
    store = tmp_path / "images"
    # A pool of 7 blocks cannot hold the three at once: preemption (by swap or recompute) must happen.
    k = make(tiny_model_dir, store, kv_memory=pool_bytes(7), swap_memory=pool_bytes(2 * seed))
    pids = {i: k.spawn(prompt, params).pid for i, (prompt, params) in enumerate(SPECS)}
    done: dict[int, list[int]] = {}
    preempted = 0
    for _ in range(400):
        live = [i for i in pids if i not in done]
        if not live:
            break
        i = rng.choice(live)
        p = k.processes[pids[i]]
        action = rng.random()
        if action < 0.08 and p.state in (ProcState.READY, ProcState.RUNNING):
            k.suspend(p.pid)
        elif action < 0.2 and p.state is ProcState.SUSPENDED:
            k.resume(p.pid)
        elif action < 0.25 and p.state in (ProcState.READY, ProcState.RUNNING, ProcState.SUSPENDED):
            hid = k.hibernate(p.pid)
            if rng.random() < 0.5:  # a restart: a brand-new kernel resumes it
                k2 = make(tiny_model_dir, store, kv_memory=pool_bytes(7), swap_memory=pool_bytes(6))
                for j, q in list(pids.items()):
                    if j not in done and j != i:
                        other = k.processes[q]
                        if other.is_finished:
                            continue
                        pids[j] = k2.restore(k.hibernate(q))
                        pids[j] = pids[j].pid
                k = k2
            pids[i] = k.restore(hid).pid
        k.step()
        check(k)
        preempted += sum(q.num_preemptions for q in k.processes.values())
        for j, pid in pids.items():
            q = k.processes.get(pid)
            if j not in done and q is not None and q.state is ProcState.FINISHED:
                done[j] = q.output_token_ids
    for j in pids:
        if j not in done:
            q = k.processes[pids[j]]
            if q.state is ProcState.SUSPENDED:
                k.resume(q.pid)
    k.run_until_done()
    for j, pid in pids.items():
        if j not in done:
            done[j] = k.processes[pid].output_token_ids
    assert [done[i] for i in range(len(SPECS))] == expected
    assert preempted > 0


def test_suspend_moves_blocks_to_swap_and_resume_brings_them_back(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path)
    prompt, params = SPECS[0]
    p = k.spawn(prompt, params)
    for _ in range(5):
        k.step()
    resident = k.block_manager.num_resident_blocks(p.pid)
    k.suspend(p.pid)
    row = k.ps()[0]
    assert row["state"] == "SUSPENDED" and row["resident_blocks"] == 0 and row["swapped_blocks"] == resident
    computed = p.num_computed_tokens
    for _ in range(3):
        k.step()  # nothing to run: it stays suspended
    assert p.num_computed_tokens == computed
    k.resume(p.pid)
    k.step()
    assert k.block_manager.num_resident_blocks(p.pid) >= resident and not k.block_manager.is_swapped(p.pid)
    k.run_until_done()
    assert p.output_token_ids == straight(tiny_model_dir, tmp_path, prompt, params)
    with pytest.raises(InvalidRequestError, match="has ended"):
        k.suspend(p.pid)


def test_suspend_without_swap_space_recomputes(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path, swap_memory=0)
    prompt, params = SPECS[1]
    p = k.spawn(prompt, params)
    for _ in range(4):
        k.step()
    k.suspend(p.pid)
    assert p.num_computed_tokens == 0 and k.block_manager.num_used_blocks == 0
    k.resume(p.pid)
    k.run_until_done()
    assert p.output_token_ids == straight(tiny_model_dir, tmp_path, prompt, params)


def test_hibernate_survives_a_restart_and_refuses_corrupt_images(tiny_model_dir, tmp_path):
    prompt, params = SPECS[2]
    k = make(tiny_model_dir, tmp_path)
    p = k.spawn(prompt, params, owner="alice")
    for _ in range(8):
        k.step()
    hid = syscalls.hibernate(k, p.pid, owner="alice")
    assert p.state is ProcState.HIBERNATED and k.block_manager.num_used_blocks == 0
    assert [r["hid"] for r in syscalls.hibernated(k, owner="alice")] == [hid]
    assert syscalls.hibernated(k, owner="bob") == []
    path = HibernationStore(tmp_path).path(hid, "alice")
    good = path.read_bytes()
    # A truncated copy is refused with a clear error and the file is left as it was.
    path.write_bytes(good[: len(good) // 2])
    k2 = make(tiny_model_dir, tmp_path)
    with pytest.raises(HibernationError):
        k2.restore(hid, owner="alice")
    path.write_bytes(good)
    with pytest.raises(HibernationError, match="no hibernated process"):
        k2.restore(hid, owner="bob")
    q = k2.restore(hid, owner="alice")
    assert q.num_computed_tokens > 0, "the K/V came back from the image"
    k2.run_until_done()
    assert q.output_token_ids == straight(tiny_model_dir, tmp_path, prompt, params)
    assert k2.streams[q.pid].text == k2.tokenizer.decode(q.output_token_ids)
    assert not path.exists(), "a restored image is consumed"


def test_hibernate_refused_by_another_model(tiny_model_dir, tmp_path, tmp_path_factory, model_factory):
    other = model_factory(tmp_path_factory.mktemp("other-llama"), seed=1)
    k = make(tiny_model_dir, tmp_path)
    p = k.spawn(ids(20, 1), SamplingParams(max_tokens=8, **GREEDY))
    k.step()
    hid = k.hibernate(p.pid)
    with pytest.raises(HibernationError, match="load that model|another model|model"):
        make(other, tmp_path).restore(hid)


# ---- policies, nice and limits ---------------------------------------------------------------


def test_priority_policy_serves_the_interactive_request_first(tiny_model_dir, tmp_path):
    def ttft(policy):
        k = make(tiny_model_dir, tmp_path, policy=policy, max_num_seqs=2)
        for s in range(6):
            k.spawn(ids(30, s), SamplingParams(max_tokens=40, **GREEDY), owner="batch", nice=10)
        for _ in range(3):
            k.step()
        p = k.spawn(ids(10, 99), SamplingParams(max_tokens=3, **GREEDY), owner="alice", nice=-10)
        steps = 0
        while p.first_token_time is None:
            k.step()
            steps += 1
            check(k)
        k.run_until_done()
        return steps
    assert ttft("priority") == 1
    assert ttft("fcfs") >= 5 * ttft("priority")


def test_nice_changes_a_running_process(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path, policy="priority")
    p = k.spawn(ids(10, 1), SamplingParams(max_tokens=5, **GREEDY))
    k.step()
    syscalls.nice(k, p.pid, 5)
    assert k.ps()[0]["nice"] == 5
    with pytest.raises(InvalidRequestError, match="-20"):
        k.nice(p.pid, 20)
    with pytest.raises(InvalidRequestError, match="-20"):
        k.spawn("hello", nice=-21)


def test_fair_policy_keeps_a_light_owner_served(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path, policy="fair", max_num_seqs=2, enable_prefix_cache=False)
    heavy = [k.spawn(ids(20, s), SamplingParams(max_tokens=20, **GREEDY), owner="heavy") for s in range(10)]
    light = [k.spawn(ids(20, 50 + s), SamplingParams(max_tokens=20, **GREEDY), owner="light") for s in range(2)]
    k.run_until_done([p.pid for p in light])
    assert sum(p.is_finished for p in heavy) <= 3, "the light owner does not wait for the heavy owner's backlog"
    counters = k.memory()["counters"]
    assert set(counters) == {"heavy", "light"}
    assert set(k.memory(owner="light")["counters"]) == {"light"}


def test_per_owner_limits(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path, max_processes_per_owner=2, max_blocks_per_owner=6)
    params = SamplingParams(max_tokens=20, **GREEDY)
    a = [k.spawn(ids(40, s), params, owner="alice") for s in range(2)]
    with pytest.raises(QuotaExceededError, match="limit is 2"):
        k.spawn(ids(5, 9), params, owner="alice")
    with pytest.raises(QuotaExceededError, match="at most 6"):
        k.spawn(ids(100, 9), params, owner="bob")
    b = k.spawn(ids(40, 7), params, owner="bob")
    while k.has_work():
        k.step()
        check(k)
        assert k.owner_blocks("alice") <= 6 and k.owner_blocks("bob") <= 6
    assert all(p.state is ProcState.FINISHED for p in a + [b])
    with pytest.raises(InvalidRequestError, match="max_blocks_per_owner"):
        make(tiny_model_dir, tmp_path, max_blocks_per_owner=0)
    with pytest.raises(InvalidRequestError, match="scheduling policy"):
        make(tiny_model_dir, tmp_path, policy="lottery")


def test_owner_isolation_of_every_syscall(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path)
    pid = syscalls.spawn(k, ids(10, 1), SamplingParams(max_tokens=5, **GREEDY), owner="alice")
    for call in (lambda: syscalls.kill(k, pid, "bob"), lambda: syscalls.suspend(k, pid, "bob"),
                 lambda: syscalls.resume(k, pid, "bob"), lambda: syscalls.hibernate(k, pid, "bob"),
                 lambda: syscalls.nice(k, pid, 1, "bob"), lambda: syscalls.fork(k, pid, 1, "bob"),
                 lambda: syscalls.children(k, pid, "bob")):
        with pytest.raises(ProcessNotFoundError):
            call()
    assert syscalls.ps(k, "bob") == [] and syscalls.top(k, "bob")["processes"] == []
    assert syscalls.top(k, "alice")["processes"][0]["pid"] == pid


# ---- stress ---------------------------------------------------------------------------------------


def test_randomized_stress_every_syscall_invariants_every_step(tiny_model_dir, tmp_path):
    """Thousands of steps with random arrivals (two owners, shared prefixes, n > 1), kills, forks, suspends,
    resumes, hibernations, renices and pool pressure; the accounting is checked after every step and every
    process ends."""
    rng = random.Random(0)
    k = make(tiny_model_dir, tmp_path, kv_memory=pool_bytes(20, 8), block_size=8, swap_memory=pool_bytes(10, 8),
             policy="priority", max_num_seqs=6, max_num_batched_tokens=64, rr_quantum=8)
    shared = ids(20, 1)
    steps = 0
    while steps < 2000:
        r = rng.random()
        live = [p for p in k.processes.values() if not p.is_finished]
        if r < 0.06 and len(live) < 12:
            prompt = (shared if rng.random() < 0.5 else []) + ids(rng.randint(1, 30), rng.random())
            params = SamplingParams(max_tokens=rng.randint(1, 30), temperature=rng.choice([0, 0.9]),
                                    seed=rng.randint(0, 9), ignore_eos=True)
            k.spawn(prompt, params, owner=rng.choice(["a", "b"]), nice=rng.randint(-5, 5), n=rng.choice([1, 1, 2]))
        elif live and r < 0.08:
            k.kill(rng.choice(live).pid)
        elif live and r < 0.10:
            p = rng.choice(live)
            if p.state in (ProcState.READY, ProcState.RUNNING):
                k.fork(p.pid, rng.randint(1, 2))
        elif live and r < 0.13:
            p = rng.choice(live)
            if p.state in (ProcState.READY, ProcState.RUNNING):
                k.suspend(p.pid)
            elif p.state is ProcState.SUSPENDED:
                k.resume(p.pid)
        elif live and r < 0.14:
            p = rng.choice(live)
            if p.state is not ProcState.NEW:
                k.restore(k.hibernate(p.pid), owner=p.owner)
        elif live and r < 0.15:
            k.nice(rng.choice(live).pid, rng.randint(-20, 19))
        k.step()
        steps += 1
        check(k)
    for p in list(k.processes.values()):
        if p.state is ProcState.SUSPENDED:
            k.resume(p.pid)
    k.run_until_done()
    check(k)
    assert all(p.is_finished for p in k.processes.values())
    assert k.block_manager.num_used_blocks == 0 and k.block_manager.num_free_swap_blocks == k.block_manager.num_swap_blocks


def test_hibernate_before_the_first_token_keeps_parallel_samples_and_rate_counts_new_tokens(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    p = k.spawn(ids(30, 2), params, n=3)
    q = k.restore(k.hibernate(p.pid))
    k.run_until_done()
    kids = [k.processes[c] for c in k.children(q.pid)]
    assert len(kids) == 2 and all(c.num_output_tokens == 6 for c in kids)
    # A restored process's tokens/s counts only the tokens generated since it came back.
    r = k.spawn(ids(20, 3), SamplingParams(max_tokens=30, **GREEDY))
    for _ in range(15):
        k.step()
    r2 = k.restore(k.hibernate(r.pid))
    for _ in range(3):
        k.step()
    row = next(x for x in k.ps() if x["pid"] == r2.pid)
    elapsed = time.monotonic() - r2.first_token_time
    assert row["output_tokens"] > 10 and row["tokens_per_s"] == pytest.approx(2 / elapsed, rel=0.5)
    assert r2.output_tokens_at_start == r2.num_output_tokens - 3


def test_logprobs_match_transformers(tiny_model_dir, tmp_path):
    import transformers as T
    k = make(tiny_model_dir, tmp_path)
    p = k.spawn(ids(12, 5), SamplingParams(max_tokens=6, temperature=0.7, seed=1, ignore_eos=True, logprobs=4))
    k.run_until_done()
    hf = T.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([p.token_ids])).logits[0].float(), -1)
    entries = k.streams[p.pid].logprobs
    assert len(entries) == 6
    for i, (chosen, top) in enumerate(entries):
        row = ref[p.num_prompt_tokens - 1 + i]
        assert chosen == pytest.approx(float(row[p.output_token_ids[i]]), abs=1e-4)
        assert [t for t, _ in top] == row.topk(4).indices.tolist()
    with pytest.raises(InvalidRequestError, match="logprobs"):
        k.spawn("hi", SamplingParams(logprobs=21))


def test_ended_processes_are_reaped_past_keep_finished(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path, keep_finished=3)
    pids = [k.spawn(ids(5, s), SamplingParams(max_tokens=2, **GREEDY)).pid for s in range(6)]
    k.run_until_done()
    assert sorted(k.processes) == pids[-3:]
    assert len(k.ps(all=True)) == 3


def test_seeded_parallel_samples_are_reproducible_across_requests(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=42, ignore_eos=True)

    def sample():
        p = k.spawn(ids(15, 8), params, n=3)
        k.run_until_done()
        return [p.output_token_ids] + [k.processes[c].output_token_ids for c in k.children(p.pid)]
    first, second = sample(), sample()
    assert first == second and len({tuple(o) for o in first}) > 1


def test_restore_keeps_the_image_until_the_process_ends_and_refuses_what_cannot_fit(tiny_model_dir, tmp_path):
    k = make(tiny_model_dir, tmp_path)
    p = k.spawn(ids(20, 4), SamplingParams(max_tokens=30, **GREEDY))
    for _ in range(4):
        k.step()
    hid = k.hibernate(p.pid)
    path = HibernationStore(tmp_path).path(hid, "local")
    q = k.restore(hid)
    k.step()
    assert path.exists(), "an interrupted resume must not lose the image"
    with pytest.raises(HibernationError, match="already running here"):
        k.restore(hid)
    small = make(tiny_model_dir, tmp_path, kv_memory=pool_bytes(2))
    with pytest.raises(OutOfBlocksError, match="needs up to"):
        small.restore(hid)
    k.run_until_done()
    assert q.state is ProcState.FINISHED and not path.exists()
    with pytest.raises(InvalidRequestError, match="UTF-8"):
        k.spawn("caf\udce9")
    with pytest.raises(InvalidRequestError, match="UTF-8"):
        k.spawn("hello", owner="\udce9")
