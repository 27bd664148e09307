"""Scheduling policies (fcfs, priority, fair/VTC, round robin), driven by a fake runner on a virtual clock,
and the two benchmark claims on the deterministic simulation (small sizes)."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmos.bench.sim import SimConfig, fairness_experiment, priority_experiment
from llmos.errors import InvalidRequestError
from llmos.kernel import proc
from llmos.kernel.kvcache import BlockManager
from llmos.kernel.proc import Process, ProcState
from llmos.kernel.sched import FairPolicy, Scheduler, SchedulingError, vtc_bound
from llmos.model.sampling import SamplingParams


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(pid, prompt_len, max_tokens, owner="u", nice=0, arrival=None):
    p = Process(pid=pid, owner=owner, model="m", prompt_token_ids=[1] * prompt_len,
                params=SamplingParams(max_tokens=max_tokens), priority=nice)
    p.arrival_time = float(pid) if arrival is None else arrival
    return p


def spawn(sched, p):
    assert sched.fits(p)
    proc.admit(p)
    sched.add(p)
    return p


def run(sched, batch):
    """The kernel's part of a step: count computed tokens, sample at the end, finish at max_tokens."""
    for p, n in batch.items:
        p.num_computed_tokens += n
        if p.num_computed_tokens == p.num_tokens:
            proc.append_token(p, 7)
            if p.num_output_tokens >= p.params.max_tokens:
                proc.finish(p, "length")
                sched.remove(p)


def step(sched, clock=None, dt=1.0):
    batch = sched.schedule()
    run(sched, batch)
    if clock is not None:
        clock.now += dt
    return batch


def pids(batch):
    return [(p.pid, n) for p, n in batch.items]


# ---------------------------------------------------------------- construction

def test_bad_policy_name_lists_the_choices():
    with pytest.raises(ValueError, match="fcfs, priority, fair") as e:
        Scheduler(BlockManager(4), policy="lottery")
    assert isinstance(e.value, InvalidRequestError)
    with pytest.raises(ValueError, match="rr_quantum"):
        Scheduler(BlockManager(4), rr_quantum=0)
    with pytest.raises(ValueError, match="aging_s"):
        Scheduler(BlockManager(4), policy="priority", aging_s=-1.0)
    policy = FairPolicy(w_p=1, w_q=1)
    assert Scheduler(BlockManager(4), policy=policy).policy is policy


def test_nice_levels_are_checked():
    sched = Scheduler(BlockManager(16, 4), policy="priority")
    p = spawn(sched, make(1, 2, 2))
    for bad in (-21, 20, 1.5, True, "0"):
        with pytest.raises(ValueError, match="nice level"):
            sched.renice(p, bad)
    assert p.priority == 0
    q = make(2, 2, 2, nice=25)
    proc.admit(q)
    with pytest.raises(SchedulingError):
        sched.add(q)


# ---------------------------------------------------------------- priority

def test_priority_admits_and_serves_best_first():
    sched = Scheduler(BlockManager(64, 4), max_num_batched_tokens=10, policy="priority", clock=Clock())
    for pid, nice in ((1, 5), (2, -5), (3, 0)):
        spawn(sched, make(pid, 6, 3, nice=nice))
    batch = sched.schedule()
    assert pids(batch) == [(2, 6), (3, 4)] and batch.admitted == [sched.running[0], sched.running[1]]
    run(sched, batch)
    sched.renice(sched.waiting[0], -20)  # pid 1: from last to first at the next step
    batch = sched.schedule()
    assert [p.pid for p, _ in batch.items][0] == 2  # decodes first in the batch...
    assert [p.pid for p in sched.running] == [1, 2, 3]  # ...but service order is now pid 1, 2, 3
    assert batch.reasons == {}  # pid 1 outranked pid 3 but a seat and blocks were free: nobody preempted


def test_priority_victim_is_worst_then_newest():
    bm = BlockManager(6, block_size=4)
    sched = Scheduler(bm, policy="priority", clock=Clock())
    a = spawn(sched, make(1, 4, 8, nice=0))
    b = spawn(sched, make(2, 4, 8, nice=3))
    c = spawn(sched, make(3, 4, 8, nice=3))
    d = spawn(sched, make(4, 4, 8, nice=-1))
    batch = step(sched)
    assert len(batch.items) == 4 and bm.num_free_blocks == 2
    batch = step(sched)  # 5 tokens each: d and a take the two free blocks, b takes c's (nice 3, newest)
    assert batch.preempted == [c] and batch.reasons == {c.pid: "blocks"}
    assert pids(batch) == [(d.pid, 1), (a.pid, 1), (b.pid, 1)] and sched.running == [d, a, b]
    while sched.has_work:
        step(sched)
        bm.check_invariants()
    assert all(p.state is ProcState.FINISHED for p in (a, b, c, d))


def test_higher_priority_arrival_preempts_lower_one_equal_does_not():
    bm = BlockManager(64, block_size=4)
    clock = Clock()
    sched = Scheduler(bm, max_num_seqs=2, policy="priority", clock=clock)
    x = spawn(sched, make(1, 4, 50, nice=10))
    y = spawn(sched, make(2, 4, 50, nice=10))
    step(sched, clock)
    spawn(sched, make(3, 4, 2, nice=10))  # an equal: waits for a seat
    batch = step(sched, clock)
    assert not batch.preempted and sched.num_waiting == 1
    z = spawn(sched, make(4, 4, 2, nice=-10))
    batch = step(sched, clock)
    assert batch.preempted == [y] and batch.reasons == {y.pid: "priority"}
    assert batch.admitted == [z] and (z, 4) in batch.items and (x, 1) in batch.items
    assert sched.waiting[0] is y and y.num_computed_tokens == 0 and y.num_preemptions == 1
    batch = step(sched, clock)  # z's first token came from its prefill; now it decodes its last
    assert z.first_token_time is not None and z.is_finished and not batch.preempted


def test_aging_prevents_starvation():
    def admitted_step(aging_s):
        clock = Clock()
        sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, policy="priority", clock=clock, aging_s=aging_s)
        low = spawn(sched, make(0, 2, 1, nice=19))
        for k in range(1, 80):  # a steady stream of nice-0 one-step processes, always one waiting
            spawn(sched, make(k, 2, 1, nice=0))
            step(sched, clock)
            if low.is_finished:
                return k
        return None

    assert admitted_step(None) is None  # no aging: the stream starves it
    k = admitted_step(1.0)  # waits until its bonus brings it to nice -1, i.e. 20 s
    assert k is not None and 20 <= k <= 22


def test_aged_process_is_not_preempted_by_a_fresher_equal():
    clock = Clock()
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, policy="priority", clock=clock, aging_s=1.0)
    old = spawn(sched, make(1, 2, 30, nice=5))
    step(sched, clock)
    clock.now += 10  # a waiting nice-5 process earns 10 levels, but never preempts its equal
    spawn(sched, make(2, 2, 1, nice=5))
    assert not step(sched, clock).preempted and old.state is ProcState.RUNNING


# ---------------------------------------------------------------- fair (VTC)

def test_fair_admits_least_served_owner_fifo_and_charges_weights():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, policy="fair")
    a1 = spawn(sched, make(1, 3, 2, owner="A"))
    a2 = spawn(sched, make(2, 3, 2, owner="A"))
    b1 = spawn(sched, make(3, 5, 2, owner="B"))
    assert sched.counters == {"A": 0.0, "B": 0.0}
    order = []
    while sched.has_work:
        batch = step(sched)
        order += [p.pid for p in batch.admitted]
    assert order == [a1.pid, b1.pid, a2.pid]  # A (tie, queued first), then B (A has 3+2), then A
    assert sched.counters == {"A": 2 * (3 * 1 + 1 * 2), "B": 5 * 1 + 1 * 2}  # w_p=1 per prompt token, w_q=2 per decode


def test_fair_counter_lift():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, policy="fair")
    spawn(sched, make(1, 8, 4, owner="A"))
    spawn(sched, make(2, 8, 4, owner="A"))
    for _ in range(3):
        step(sched)
    assert sched.counters["A"] == 8 + 2 * 2
    spawn(sched, make(3, 2, 1, owner="B"))  # new, idle so far: lifted to min over backlogged (A)
    assert sched.counters["B"] == 12.0
    spawn(sched, make(4, 2, 1, owner="B"))  # B already backlogged: no lift
    assert sched.counters["B"] == 12.0
    admitted = []
    while sched.has_work:
        admitted += step(sched).admitted
    assert [p.pid for p in admitted] == [3, 2, 4]  # B (12 < 14), then A (tie at 14, queued first), then B
    last = sched.counters
    assert last == {"A": 28.0, "B": 16.0}
    spawn(sched, make(5, 2, 1, owner="C"))  # no one backlogged: lifted to the owner that left the queue last
    assert sched.counters["C"] == last["B"]


def test_fair_victim_is_newest_of_the_most_served_owner():
    bm = BlockManager(6, block_size=4)
    sched = Scheduler(bm, policy="fair")
    a1 = spawn(sched, make(1, 8, 4, owner="A"))
    b1 = spawn(sched, make(2, 2, 4, owner="B"))
    a2 = spawn(sched, make(3, 8, 4, owner="A"))
    b2 = spawn(sched, make(4, 2, 4, owner="B"))
    step(sched)
    assert sched.counters == {"A": 16.0, "B": 4.0} and bm.num_free_blocks == 0
    batch = step(sched)  # a1 needs a third block: A is the most served, a2 its newest (fcfs would take b2)
    assert batch.preempted == [a2] and batch.reasons == {a2.pid: "blocks"}
    assert pids(batch) == [(1, 1), (2, 1), (4, 1)]
    while sched.has_work:
        step(sched)
        bm.check_invariants()
    assert all(p.state is ProcState.FINISHED for p in (a1, a2, b1, b2))


def test_vtc_bound():
    assert vtc_bound(100, 1000) == 2 * max(1 * 100, 2 * 1000)
    assert vtc_bound(5000, 1000, w_p=1, w_q=2) == 10000


# ---------------------------------------------------------------- round robin

@pytest.mark.parametrize("policy", ["fcfs", "fair", "priority"])
def test_rr_quantum_sends_a_long_generation_to_the_back(policy):
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, policy=policy, rr_quantum=3, clock=Clock())
    long = spawn(sched, make(1, 2, 100))
    step(sched)  # prefill (samples the first token)
    short = spawn(sched, make(2, 2, 2))
    other = spawn(sched, make(3, 2, 2))
    for _ in range(3):
        assert pids(step(sched)) == [(1, 1)]  # three decodes: the quantum
    batch = sched.schedule()
    assert batch.preempted == [long] and batch.reasons == {long.pid: "quantum"}
    assert batch.admitted == [short] and list(sched.waiting) == [other, long]  # at the BACK
    run(sched, batch)
    while sched.has_work:
        step(sched)
    assert long.num_output_tokens == 100 and long.num_preemptions >= 1


def test_rr_off_or_nobody_waiting_keeps_running():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1)
    long = spawn(sched, make(1, 2, 20))
    spawn(sched, make(2, 2, 2))
    for _ in range(10):
        assert not step(sched).preempted
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, rr_quantum=2)
    long = spawn(sched, make(1, 2, 20))
    for _ in range(10):
        assert not step(sched).preempted
    assert long.state is ProcState.RUNNING


# ---------------------------------------------------------------- the benchmark claims, small

SMALL = SimConfig(num_blocks=128, block_size=16, max_num_seqs=8, max_num_batched_tokens=256)


def test_claim_a_fair_stays_within_the_vtc_bound_fcfs_does_not():
    kw = dict(light_requests=40, duration_s=8.0, prompt_tokens=(16, 128), output_tokens=(16, 128))
    fair, fcfs = fairness_experiment("fair", SMALL, **kw), fairness_experiment("fcfs", SMALL, **kw)
    assert fair["requests"] == {"A": 400, "B": 40}
    assert fair["both_backlogged_s"] > 3 and fcfs["both_backlogged_s"] > 3
    assert fair["max_diff"] <= fair["bound"] and fair["within_bound"]
    assert fcfs["max_diff"] > fcfs["bound"] and not fcfs["within_bound"]


def test_claim_b_priority_ttft_at_least_5x_lower():
    kw = dict(batch_requests=24, batch_prompt_tokens=64, batch_output_tokens=(32, 96))
    fcfs, prio = priority_experiment("fcfs", SMALL, **kw), priority_experiment("priority", SMALL, **kw)
    assert fcfs["interactive_arrival_s"] == prio["interactive_arrival_s"]
    assert prio["interactive_ttft_s"] * 5 <= fcfs["interactive_ttft_s"]


# ---------------------------------------------------------------- hypothesis: no process is ever lost

def check_batch(sched, bm, batch, running_before):
    bm.check_invariants()
    assert batch.num_tokens <= sched.max_num_batched_tokens
    assert sched.num_running <= sched.max_num_seqs
    procs = [p for p, _ in batch.items]
    assert len(set(map(id, procs))) == len(procs)
    for p, n in batch.items:
        assert p.state is ProcState.RUNNING and p in sched.running and 1 <= n <= p.num_uncomputed_tokens
        assert len(bm.block_table(p.pid)) >= bm.blocks_needed(p.num_computed_tokens + n)
    assert set(batch.reasons) == {p.pid for p in batch.preempted}
    for p in batch.preempted:
        assert p.state is ProcState.READY and p in sched.waiting and p not in procs and id(p) in running_before
    assert {id(p) for p in batch.admitted} == {id(p) for p in procs} - running_before
    assert len(sched.waiting) + len(sched.running) == len({id(p) for p in [*sched.waiting, *sched.running]})
    for p in sched.waiting:
        assert p.state is ProcState.READY and bm.block_table(p.pid) == []
    assert bm.num_used_blocks == sum(len(bm.block_table(p.pid)) for p in sched.running)


@st.composite
def workloads(draw):
    num_blocks, block_size = draw(st.integers(4, 24)), draw(st.sampled_from([2, 4]))
    cap = num_blocks * block_size
    procs = []
    for _ in range(draw(st.integers(1, 20))):
        prompt = draw(st.integers(1, min(20, cap - 1)))
        procs.append((draw(st.integers(0, 30)), draw(st.sampled_from("abc")), prompt,
                      draw(st.integers(1, min(20, cap - prompt))), draw(st.integers(-20, 19))))
    return dict(policy=draw(st.sampled_from(["fcfs", "priority", "fair"])), num_blocks=num_blocks,
                block_size=block_size, max_num_seqs=draw(st.integers(1, 6)),
                max_num_batched_tokens=draw(st.integers(1, 24)),
                prefill_chunk_size=draw(st.none() | st.integers(1, 8)), rr_quantum=draw(st.none() | st.integers(1, 6)),
                aging_s=draw(st.sampled_from([None, 0.5, 3.0, 50.0])), procs=sorted(procs, key=lambda t: t[0]),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_never_lose_a_process(w):
    rng = random.Random(w["seed"])
    clock = Clock()
    bm = BlockManager(w["num_blocks"], w["block_size"])
    sched = Scheduler(bm, w["max_num_seqs"], w["max_num_batched_tokens"], w["prefill_chunk_size"],
                      policy=w["policy"], clock=clock, rr_quantum=w["rr_quantum"], aging_s=w["aging_s"])
    pending, everyone = list(w["procs"]), []
    for steps in range(5000):
        while pending and pending[0][0] <= steps:
            _, owner, prompt, out, nice = pending.pop(0)
            everyone.append(spawn(sched, make(len(everyone), prompt, out, owner=owner, nice=nice, arrival=clock.now)))
        live = sched.running + list(sched.waiting)
        if live and rng.random() < 0.02:
            victim = rng.choice(live)
            proc.kill(victim)
            sched.remove(victim)
        if live and rng.random() < 0.05:
            sched.renice(rng.choice(live), rng.randint(-20, 19))
        if not (pending or sched.has_work):
            break
        running_before, had_work = {id(p) for p in sched.running}, sched.has_work
        batch = sched.schedule()
        check_batch(sched, bm, batch, running_before)
        run(sched, batch)
        clock.now += 1.0
        assert batch.items or not had_work, "a step with work scheduled nothing"
    else:
        pytest.fail(f"livelock: {sched.num_running} running, {sched.num_waiting} waiting")
    for p in everyone:
        assert p.is_finished and bm.block_table(p.pid) == []
        if p.state is ProcState.FINISHED:
            assert p.num_output_tokens == p.params.max_tokens
    assert bm.num_free_blocks == bm.num_blocks and not sched.has_work
