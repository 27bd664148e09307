"""Process state machine and Scheduler, driven by a fake runner (no model, no tensors)."""

import random
from dataclasses import dataclass

import pytest

from llmos.kernel import proc
from llmos.kernel.kvcache import BlockManager
from llmos.kernel.proc import InvalidTransitionError, Process, ProcState
from llmos.kernel.sched import FcfsPolicy, Scheduler

try:
    from llmos.model.sampling import SamplingParams
except ImportError:  # written in parallel; the scheduler only reads max_tokens
    @dataclass(frozen=True)
    class SamplingParams:
        max_tokens: int = 128


def make_proc(pid, prompt_len, max_tokens, arrival=None):
    p = Process(pid=pid, owner="u", model="m", prompt_token_ids=list(range(1, prompt_len + 1)),
                params=SamplingParams(max_tokens=max_tokens))
    if arrival is not None:
        p.arrival_time = arrival
    return p


def spawn(sched, p):
    assert sched.fits(p)
    proc.admit(p)
    sched.add(p)
    return p


def fake_token(p):
    return 1000 + p.pid * 7 + p.num_tokens  # deterministic in (pid, position)


def fake_run(sched, batch):
    """What the kernel does after the model ran: count computed tokens, sample at the
    end of the sequence, finish at max_tokens and retire at once."""
    done = []
    for p, n in batch.items:
        p.num_computed_tokens += n
        if p.num_computed_tokens == p.num_tokens:
            proc.append_token(p, fake_token(p))
            if p.num_output_tokens >= p.params.max_tokens:
                proc.finish(p, "length")
                sched.remove(p)
                done.append(p)
    return done


# ---------------------------------------------------------------- proc.py

def test_state_machine_legal_path_and_timings():
    p = make_proc(1, 3, 2)
    assert p.state is ProcState.NEW and p.token_ids == [1, 2, 3] and p.is_prefill
    proc.admit(p)
    proc.start(p)
    p.num_computed_tokens = 3
    assert not p.is_prefill  # 0 uncomputed, but the sample happens first
    proc.append_token(p, 9)
    assert p.first_token_time is not None and p.token_ids == [1, 2, 3, 9] and p.output_token_ids == [9]
    assert not p.is_prefill and p.num_uncomputed_tokens == 1
    proc.preempt(p)
    assert p.state is ProcState.READY and p.num_computed_tokens == 0 and p.num_preemptions == 1 and p.is_prefill
    proc.start(p)
    proc.finish(p, "length")
    assert p.is_finished and p.finish_reason == "length" and p.finish_time >= p.arrival_time


def test_one_token_prompt_is_prefill_until_computed():
    p = make_proc(1, 1, 2)
    assert p.is_prefill and p.num_uncomputed_tokens == 1


@pytest.mark.parametrize("fn", [proc.start, proc.preempt, lambda p: proc.finish(p, "stop")])
def test_illegal_transitions_from_new(fn):
    p = make_proc(1, 2, 2)
    with pytest.raises(InvalidTransitionError, match="NEW"):
        fn(p)
    assert p.state is ProcState.NEW


def test_kill_from_every_live_state_and_final_states():
    for steps in ([], [proc.admit], [proc.admit, proc.start]):
        p = make_proc(1, 2, 2)
        for s in steps:
            s(p)
        proc.kill(p)
        assert p.state is ProcState.KILLED and p.finish_reason == "killed" and p.is_finished
        for fn in (proc.kill, proc.admit, proc.start, proc.preempt, lambda q: proc.append_token(q, 1)):
            with pytest.raises(InvalidTransitionError):
                fn(p)
    p = make_proc(2, 2, 2)
    proc.admit(p), proc.start(p)
    with pytest.raises(ValueError):
        proc.finish(p, "bored")


# ---------------------------------------------------------------- sched.py: fixed scenarios

def test_preemption_must_happen_newest_goes_to_front():
    bm = BlockManager(4, block_size=4)
    sched = Scheduler(bm)
    a = spawn(sched, make_proc(1, 6, 6, arrival=1.0))
    b = spawn(sched, make_proc(2, 6, 6, arrival=2.0))
    c = spawn(sched, make_proc(3, 2, 1, arrival=3.0))
    batch = sched.schedule()
    assert [(p.pid, n) for p, n in batch.items] == [(1, 6), (2, 6)] and bm.num_free_blocks == 0
    fake_run(sched, batch)
    for _ in range(2):  # tokens 7 and 8 still fit in two blocks
        batch = sched.schedule()
        assert not batch.preempted
        fake_run(sched, batch)
    batch = sched.schedule()  # a needs a third block: b (newest running) is preempted
    assert batch.preempted == [b] and [(p.pid, n) for p, n in batch.items] == [(1, 1)]
    assert list(sched.waiting) == [b, c] and b.state is ProcState.READY and b.num_computed_tokens == 0
    assert bm.block_table(b.pid) == [] and bm.num_free_blocks == 1  # free, yet b is not re-admitted
    while sched.has_work:
        fake_run(sched, sched.schedule())
        bm.check_invariants()
    assert a.num_output_tokens == b.num_output_tokens == 6 and b.num_preemptions == 1
    assert bm.num_used_blocks == 0


def test_newest_preempts_itself():
    bm = BlockManager(3, block_size=4)
    sched = Scheduler(bm)
    a = spawn(sched, make_proc(1, 5, 4, arrival=1.0))
    b = spawn(sched, make_proc(2, 4, 4, arrival=2.0))
    fake_run(sched, sched.schedule())
    batch = sched.schedule()  # b needs a second block; b is the newest, so b goes
    assert batch.preempted == [b] and [(p.pid, n) for p, n in batch.items] == [(a.pid, 1)]
    assert sched.running == [a] and list(sched.waiting) == [b]


def test_chunked_prefill_budget_and_decode_first():
    bm = BlockManager(64, block_size=4)
    sched = Scheduler(bm, max_num_batched_tokens=8, prefill_chunk_size=5)
    a = spawn(sched, make_proc(1, 2, 3, arrival=1.0))
    b = spawn(sched, make_proc(2, 13, 2, arrival=2.0))
    batch = sched.schedule()
    assert [(p.pid, n) for p, n in batch.items] == [(1, 2), (2, 5)]
    fake_run(sched, batch)
    batch = sched.schedule()  # a decodes, b gets its next chunk: decode first
    assert [(p.pid, n) for p, n in batch.items] == [(1, 1), (2, 5)]
    fake_run(sched, batch)
    batch = sched.schedule()
    assert [(p.pid, n) for p, n in batch.items] == [(1, 1), (2, 3)]
    assert b.num_output_tokens == 0
    fake_run(sched, batch)
    assert b.num_output_tokens == 1 and a.is_finished


def test_budget_leaves_later_processes_idle_and_max_num_seqs():
    bm = BlockManager(64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=10)
    procs = [spawn(sched, make_proc(i, 7, 2, arrival=float(i))) for i in range(4)]
    batch = sched.schedule()
    assert [(p.pid, n) for p, n in batch.items] == [(0, 7), (1, 3)]
    assert sched.num_running == 2 and sched.num_waiting == 2
    fake_run(sched, batch)
    batch = sched.schedule()
    assert [(p.pid, n) for p, n in batch.items] == [(0, 1), (1, 4)] and procs[1].num_computed_tokens == 3


def test_fits_and_remove_rules():
    bm = BlockManager(4, block_size=4)
    sched = Scheduler(bm)
    assert sched.fits(make_proc(1, 10, 6)) and not sched.fits(make_proc(2, 10, 7))
    p = spawn(sched, make_proc(3, 4, 2))
    with pytest.raises(InvalidTransitionError):
        sched.add(make_proc(4, 1, 1))  # NEW, not READY
    sched.schedule()
    with pytest.raises(InvalidTransitionError, match="finish or kill"):
        sched.remove(p)
    proc.kill(p)
    sched.remove(p)
    assert not sched.has_work and bm.num_used_blocks == 0


# ---------------------------------------------------------------- sched.py: randomized simulation

def check_step(sched, bm, batch, running_before):
    bm.check_invariants()
    assert batch.num_tokens <= sched.max_num_batched_tokens
    assert sched.num_running <= sched.max_num_seqs
    procs = [p for p, _ in batch.items]
    assert len(set(map(id, procs))) == len(procs), "a process scheduled twice"
    for p, n in batch.items:
        assert p.state is ProcState.RUNNING and p in sched.running
        assert 1 <= n <= p.num_uncomputed_tokens
        assert sched.prefill_chunk_size is None or n <= sched.prefill_chunk_size
        assert len(bm.block_table(p.pid)) >= bm.blocks_needed(p.num_computed_tokens + n)
    kinds = [n == 1 and p.num_computed_tokens > 0 for p, n in batch.items]
    assert kinds == sorted(kinds, reverse=True), "decode items must come first"
    k = len(batch.preempted)
    assert list(sched.waiting)[:k] == batch.preempted[::-1], "preempted go to the front"
    assert batch.reasons == {p.pid: "blocks" for p in batch.preempted}
    assert {id(p) for p in batch.admitted} == {id(p) for p in procs} - running_before
    if batch.preempted:
        assert all(id(p) in running_before for p in procs), "admitted in a step that preempted"
    for p in batch.preempted:
        assert p.state is ProcState.READY and p.num_computed_tokens == 0 and p not in procs
        assert all(q.arrival_time < p.arrival_time for q in sched.running), "preempted one not the newest"
    for p in sched.waiting:
        assert p.state is ProcState.READY and bm.block_table(p.pid) == []
    for p in sched.running:
        assert len(bm.block_table(p.pid)) >= bm.blocks_needed(p.num_computed_tokens)
    assert bm.num_used_blocks == sum(len(bm.block_table(p.pid)) for p in sched.running)


def simulate(seed, num_blocks, block_size=4, max_num_seqs=6, max_num_batched_tokens=24,
             prefill_chunk_size=None, num_procs=150, kill_prob=0.01, max_steps=20_000, policy="fcfs", trace=None):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs, max_num_batched_tokens, prefill_chunk_size, policy=policy)
    cap = num_blocks * block_size
    arrivals = sorted(rng.randrange(0, num_procs * 3) for _ in range(num_procs))
    all_procs, num_preempted, step = [], 0, 0
    while arrivals or sched.has_work:
        assert step < max_steps, f"livelock: {sched.num_running} running, {sched.num_waiting} waiting"
        while arrivals and arrivals[0] <= step:
            arrivals.pop(0)
            prompt = rng.randint(1, min(40, cap - 1))
            p = make_proc(len(all_procs), prompt, rng.randint(1, min(30, cap - prompt)),
                          arrival=step + len(all_procs) * 1e-6)
            all_procs.append(spawn(sched, p))
        live = sched.running + list(sched.waiting)
        if live and rng.random() < kill_prob:
            victim = rng.choice(live)
            proc.kill(victim)
            sched.remove(victim)
        running_before = {id(p) for p in sched.running}
        batch = sched.schedule()
        check_step(sched, bm, batch, running_before)
        if trace is not None:
            trace.append(([(p.pid, n) for p, n in batch.items], [p.pid for p in batch.preempted]))
        num_preempted += len(batch.preempted)
        if sched.has_work:
            assert batch.items, "a step with work scheduled nothing"
        for p in fake_run(sched, batch):
            assert bm.block_table(p.pid) == []
        step += 1
    for p in all_procs:
        assert p.is_finished and bm.block_table(p.pid) == []
        if p.state is ProcState.FINISHED:
            assert p.num_output_tokens == p.params.max_tokens
            assert p.num_computed_tokens == p.num_tokens - 1
    assert bm.num_free_blocks == num_blocks
    return num_preempted, step


@pytest.mark.parametrize("seed", range(8))
def test_simulation_small_pool(seed):
    chunk = [None, 3, 8][seed % 3]
    preempted, steps = simulate(seed, num_blocks=12 + seed, prefill_chunk_size=chunk)
    assert steps > 1000 and preempted > 0, "the small pool should force preemption"


@pytest.mark.parametrize("seed", range(4))
def test_simulation_huge_pool_never_preempts(seed):
    preempted, _ = simulate(100 + seed, num_blocks=150 * 18, kill_prob=0.0)  # room for everyone at once
    assert preempted == 0


def test_simulation_tight_pool_one_seat():
    simulate(7, num_blocks=6, max_num_seqs=1, max_num_batched_tokens=5, num_procs=15)
    simulate(8, num_blocks=6, max_num_seqs=16, max_num_batched_tokens=1, num_procs=15)


def test_fcfs_by_name_default_and_object_schedule_identically():
    traces = []
    for policy in ("fcfs", FcfsPolicy()):
        traces.append([])
        simulate(3, num_blocks=14, prefill_chunk_size=3, kill_prob=0.0, policy=policy, trace=traces[-1])
    default = []
    simulate(3, num_blocks=14, prefill_chunk_size=3, kill_prob=0.0, trace=default)
    assert traces[0] == traces[1] == default and any(pre for _, pre in default)
