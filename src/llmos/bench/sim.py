"""Scheduling policies on a virtual clock: a deterministic discrete-event simulation of the kernel loop.

Drives the real Scheduler, BlockManager and Process objects exactly as `Kernel.step` does, with
no model: a step that computes T tokens takes `step_base_s + step_per_token_s * T` virtual seconds,
and a process that completes its uncomputed tokens samples one token (always 0). Never reads the
wall clock, never sleeps, never touches tensors: the same inputs give the same numbers everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from llmos.kernel import proc
from llmos.kernel.kvcache import BlockManager
from llmos.kernel.proc import Process
from llmos.kernel.sched import DEFAULT_AGING_S, Policy, ScheduledBatch, Scheduler, vtc_bound
from llmos.model.sampling import SamplingParams

W_PREFILL, W_DECODE = 1.0, 2.0  # service weights per token (VTC's w_p, w_q): the fairness metric


@dataclass(frozen=True)
class Arrival:
    """One request: it arrives at `time` (virtual seconds) and generates exactly `output_tokens`."""

    time: float
    owner: str
    prompt_tokens: int
    output_tokens: int
    nice: int = 0


@dataclass
class SimConfig:
    """The simulated kernel: KV pool (`num_blocks` x `block_size` tokens), scheduler limits and
    the step-time model `step_base_s + step_per_token_s * tokens` (seconds)."""

    num_blocks: int = 512  # 16 seats x 32 blocks: every request of the experiments below fits at once
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    prefill_chunk_size: int | None = None
    rr_quantum: int | None = None
    aging_s: float | None = DEFAULT_AGING_S
    step_base_s: float = 0.010
    step_per_token_s: float = 0.0001

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass
class SimResult:
    """What happened. Times in virtual seconds; `served[owner]`: weighted tokens computed for it
    (W_PREFILL per prefill token, recomputes included, W_DECODE per decode token)."""

    processes: list[Process]
    arrivals: list[Arrival]
    first_token_s: dict[int, float] = field(default_factory=dict)  # pid -> virtual time of its first token
    finish_s: dict[int, float] = field(default_factory=dict)
    served: dict[str, float] = field(default_factory=dict)
    preemptions: dict[str, int] = field(default_factory=dict)  # reason -> count
    steps: int = 0
    end_s: float = 0.0

    def ttft_s(self, pid: int) -> float:
        return self.first_token_s[pid] - self.arrivals[pid].time


Observer = Callable[[float, Scheduler, ScheduledBatch, SimResult], None]


def simulate(arrivals: list[Arrival], policy: str | Policy = "fcfs", config: SimConfig | None = None,
             before_step: Observer | None = None, after_step: Observer | None = None,
             check: bool = False, max_steps: int = 2_000_000) -> SimResult:
    """Run `arrivals` (sorted by time; pid i is arrivals[i]) to completion under `policy`.

    `before_step(now, sched, None, result)` runs after the step's arrivals are queued and before
    schedule(); `after_step(now, sched, batch, result)` after the step's tokens are in (now = the
    step's end). `check`: BlockManager.check_invariants after every step. Raises RuntimeError past
    `max_steps` (a livelock) or when a step with work schedules nothing.
    """
    config = config or SimConfig()
    if any(b.time < a.time for a, b in zip(arrivals, arrivals[1:])):
        raise ValueError("arrivals must be sorted by time")
    now = 0.0
    bm = BlockManager(config.num_blocks, config.block_size)
    sched = Scheduler(bm, config.max_num_seqs, config.max_num_batched_tokens, config.prefill_chunk_size,
                      policy=policy, clock=lambda: now, rr_quantum=config.rr_quantum, aging_s=config.aging_s)
    result = SimResult(processes=[], arrivals=list(arrivals))
    pending = 0
    while pending < len(arrivals) or sched.has_work:
        if result.steps >= max_steps:
            raise RuntimeError(f"no end after {max_steps} steps: {sched.num_running} running, "
                               f"{sched.num_waiting} waiting")
        if not sched.has_work:
            now = max(now, arrivals[pending].time)
        while pending < len(arrivals) and arrivals[pending].time <= now:
            a = arrivals[pending]
            p = Process(pid=pending, owner=a.owner, model="sim", prompt_token_ids=[1] * a.prompt_tokens,
                        params=SamplingParams(max_tokens=a.output_tokens), priority=a.nice, arrival_time=a.time)
            if not sched.fits(p):
                raise ValueError(f"arrival {pending} needs more blocks than the pool has")
            proc.admit(p)
            sched.add(p)
            result.processes.append(p)
            result.served.setdefault(a.owner, 0.0)
            pending += 1
        if before_step is not None:
            before_step(now, sched, None, result)
        batch = sched.schedule()
        if batch.is_empty:
            raise RuntimeError(f"step {result.steps} scheduled nothing with {sched.num_running} running, "
                               f"{sched.num_waiting} waiting")
        for reason in batch.reasons.values():
            result.preemptions[reason] = result.preemptions.get(reason, 0) + 1
        now += config.step_base_s + config.step_per_token_s * batch.num_tokens
        for p, n in batch.items:
            result.served[p.owner] += n * (W_PREFILL if p.is_prefill else W_DECODE)
            p.num_computed_tokens += n
            if p.num_computed_tokens == p.num_tokens:
                if p.num_output_tokens == 0:
                    result.first_token_s[p.pid] = now
                proc.append_token(p, 0)
                if p.num_output_tokens >= p.params.max_tokens:
                    proc.finish(p, "length")
                    sched.remove(p)
                    result.finish_s[p.pid] = now
        result.steps += 1
        if check:
            bm.check_invariants()
        if after_step is not None:
            after_step(now, sched, batch, result)
    result.end_s = now
    return result


# ---------------------------------------------------------------- (a) fairness: two owners, one sends 10x

def fairness_workload(light_requests: int = 180, ratio: int = 10, duration_s: float = 30.0,
                      prompt_tokens: tuple[int, int] = (32, 256), output_tokens: tuple[int, int] = (32, 256),
                      seed: int = 0) -> list[Arrival]:
    """Owner "A" sends `ratio` x `light_requests` requests and owner "B" `light_requests`, each evenly
    spread over [0, duration_s); lengths uniform in the given ranges (the same for both owners),
    drawn from random.Random(seed)."""
    rng = random.Random(seed)
    out = []
    for owner, count in (("A", ratio * light_requests), ("B", light_requests)):
        for i in range(count):
            out.append(Arrival(duration_s * i / count, owner, rng.randint(*prompt_tokens), rng.randint(*output_tokens)))
    return sorted(out, key=lambda a: (a.time, a.owner))


def fairness_experiment(policy: str | Policy = "fair", config: SimConfig | None = None, **workload) -> dict:
    """Experiment (a): two owners, A sending 10x the requests of B, both backlogged.

    Records, per step, each owner's cumulative weighted service, whether both owners had a waiting
    process when the step was scheduled, and the difference gained since such a stretch of steps
    began. `max_diff`: over every stretch of steps with both backlogged, the largest
    |service_A - service_B| over [t1, t2) inside it (max - min of the running difference), the
    quantity the VTC bound limits; `bound` = 2U from `vtc_bound` (L_input = the longest prompt,
    M = the KV pool's tokens). `workload`: arguments of `fairness_workload`.
    """
    config = config or SimConfig()
    arrivals = fairness_workload(**workload)
    times, served_a, served_b, both = [0.0], [0.0], [0.0], [False]

    def before(now, sched, _batch, _result):
        owners = {p.owner for p in sched.waiting}
        both.append("A" in owners and "B" in owners)

    def after(now, _sched, _batch, result):
        times.append(now)
        served_a.append(result.served.get("A", 0.0))
        served_b.append(result.served.get("B", 0.0))

    result = simulate(arrivals, policy, config, before_step=before, after_step=after)
    # both[k] (k >= 1) says whether step k was scheduled with both owners backlogged; step k moves the
    # service from sample k-1 to sample k.
    # since[k]: (service A - service B) gained since the stretch of backlogged steps began, None outside one.
    max_diff, backlogged_s, stretch, since = 0.0, 0.0, None, [None]
    for k in range(1, len(times)):
        if both[k]:
            d_prev, d = served_a[k - 1] - served_b[k - 1], served_a[k] - served_b[k]
            start, lo, hi = stretch if stretch else (d_prev, d_prev, d_prev)
            stretch = (start, min(lo, d), max(hi, d))
            max_diff = max(max_diff, stretch[2] - stretch[1])
            backlogged_s += times[k] - times[k - 1]
            since.append(d - start)
        else:
            stretch = None
            since.append(None)
    max_prompt = max(a.prompt_tokens for a in arrivals)
    bound = vtc_bound(max_prompt, config.kv_capacity_tokens, W_PREFILL, W_DECODE)
    requests = {o: sum(a.owner == o for a in arrivals) for o in ("A", "B")}
    return {
        "policy": policy if isinstance(policy, str) else policy.name,
        "requests": requests, "served": dict(result.served),
        "max_diff": max_diff, "bound": bound, "within_bound": max_diff <= bound,
        "U": bound / 2, "max_prompt_tokens": max_prompt, "kv_capacity_tokens": config.kv_capacity_tokens,
        "both_backlogged_s": backlogged_s, "end_s": result.end_s, "steps": result.steps,
        "preemptions": result.preemptions,
        "series": {"t": times, "A": served_a, "B": served_b, "both_backlogged": both, "diff_since_backlogged": since},
    }


# ---------------------------------------------------------------- (b) priority: interactive during a batch job

def priority_workload(batch_requests: int = 64, batch_prompt_tokens: int = 256,
                      batch_output_tokens: tuple[int, int] = (128, 256), batch_nice: int = 10,
                      interactive_at: float | None = None, interactive_prompt_tokens: int = 32,
                      interactive_output_tokens: int = 16, interactive_nice: int = -10, seed: int = 0) -> list[Arrival]:
    """A batch job (owner "batch": `batch_requests` long requests at nice `batch_nice`, all at t=0, output
    lengths uniform in `batch_output_tokens` from random.Random(seed)), plus, when `interactive_at` is
    given, one short request of owner "interactive" at nice `interactive_nice`."""
    rng = random.Random(seed)
    out = [Arrival(0.0, "batch", batch_prompt_tokens, rng.randint(*batch_output_tokens), batch_nice)
           for _ in range(batch_requests)]
    if interactive_at is not None:
        out.append(Arrival(interactive_at, "interactive", interactive_prompt_tokens, interactive_output_tokens,
                           interactive_nice))
    return out


def priority_experiment(policy: str | Policy = "priority", config: SimConfig | None = None,
                        at_fraction: float = 0.5, **workload) -> dict:
    """Experiment (b): a short interactive request (nice -10) arriving during a long batch job (nice 10).

    It arrives `at_fraction` of the way through the batch job's makespan when run alone under fcfs
    (the same instant whatever `policy`). Reports its time to first token (TTFT) and the batch job's
    makespan. `workload`: arguments of `priority_workload` (except interactive_at).
    """
    config = config or SimConfig()
    alone = simulate(priority_workload(**workload), "fcfs", config)
    at = at_fraction * alone.end_s
    arrivals = priority_workload(interactive_at=at, **workload)
    result = simulate(arrivals, policy, config)
    pid = len(arrivals) - 1
    batch_ttft = sorted(result.ttft_s(i) for i in range(pid))
    return {
        "policy": policy if isinstance(policy, str) else policy.name,
        "interactive_arrival_s": at, "interactive_ttft_s": result.ttft_s(pid),
        "interactive_latency_s": result.finish_s[pid] - at,
        "batch_makespan_s": max(result.finish_s[i] for i in range(pid)),
        "batch_ttft_p50_s": batch_ttft[len(batch_ttft) // 2],
        "preemptions": result.preemptions, "steps": result.steps,
    }
