"""Kernel benchmarks (issue 3): prefix-cache time to first token, fork/copy-on-write KV footprint, and
real-kernel runs of the scheduling policies (fairness between owners, priority for an interactive request).

Owns these workloads and their measurements. Each function drives one in-process `Kernel` and returns a
plain dict; `run_kernel_benchmarks` runs them all, prints tables, and writes JSON, Markdown and charts.
The virtual-clock scheduling simulation lives in `llmos.bench.sim`.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmos.bench.checkpoints import resolve_model
from llmos.kernel.kernel import Kernel, KernelConfig
from llmos.kernel.sched import vtc_bound
from llmos.model.sampling import SamplingParams

FIRST_TOKEN_ID = 100  # random prompt ids stay clear of the special tokens at the bottom of the vocabulary


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(n)]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def prefix_cache_run(model_dir: Path, enable: bool, requests: int = 16, system_tokens: int = 1000,
                     question_tokens: int = 16, max_tokens: int = 8, seed: int = 0) -> dict:
    """`requests` requests sharing one `system_tokens`-token system prompt, each with its own question, sent one
    after another (each when the previous has finished, as a chat front end does). Returns each request's
    time to first token (s), outputs, and the prefix-cache counters."""
    kernel = Kernel(model_dir, KernelConfig(kv_memory="1GiB", enable_prefix_cache=enable,
                                            max_num_batched_tokens=2048))
    vocab = kernel.model_config.vocab_size
    rng = random.Random(seed)
    system = _ids(rng, system_tokens, vocab)
    warm = kernel.spawn(_ids(random.Random(seed + 99), 16, vocab), _greedy(2), owner="warmup")
    kernel.run_until_done([warm.pid])
    ttft, outputs = [], []
    for _ in range(requests):
        p = kernel.spawn(system + _ids(rng, question_tokens, vocab), _greedy(max_tokens), owner="bench")
        kernel.run_until_done([p.pid])
        ttft.append(p.first_token_time - p.arrival_time)
        outputs.append(list(p.output_token_ids))
    return {"enable_prefix_cache": enable, "ttft_s": ttft, "outputs": outputs,
            "prefix_cache": kernel.memory()["prefix_cache"]}


def prefix_cache_benchmark(model_dir: Path, **kw) -> dict:
    """Cache off against cache on: median TTFT of the later requests (2..n) and the ratio; outputs must match."""
    off, on = prefix_cache_run(model_dir, False, **kw), prefix_cache_run(model_dir, True, **kw)
    later_off, later_on = statistics.median(off["ttft_s"][1:]), statistics.median(on["ttft_s"][1:])
    return {"off": off, "on": on, "later_ttft_off_s": later_off, "later_ttft_on_s": later_on,
            "speedup": later_off / later_on, "same_outputs": off["outputs"] == on["outputs"]}


def fork_run(model_dir: Path, mode: str, n: int = 8, prompt_tokens: int = 512, max_tokens: int = 32,
             seed: int = 0) -> dict:
    """`n` continuations of one `prompt_tokens`-token prompt, sampled (temperature 0.8, seeded). `mode`:
    "fork" (one process, n-way parallel sampling by fork + copy-on-write), "independent" (n processes, prefix
    cache off) or "independent-cached" (n processes, prefix cache on). Returns the peak KV blocks in use."""
    kernel = Kernel(model_dir, KernelConfig(kv_memory="1GiB", enable_prefix_cache=mode == "independent-cached",
                                            max_num_batched_tokens=1024))
    prompt = _ids(random.Random(seed), prompt_tokens, kernel.model_config.vocab_size)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed, ignore_eos=True)
    if mode == "fork":
        kernel.spawn(prompt, params, n=n)
    else:
        for i in range(n):
            kernel.spawn(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed + i,
                                                ignore_eos=True))
    peak = 0
    t0 = time.monotonic()
    while kernel.has_work():
        kernel.step()
        peak = max(peak, kernel.block_manager.num_used_blocks)
    outputs = [p.output_token_ids for p in kernel.processes.values()]
    return {"mode": mode, "peak_blocks": peak, "block_size": kernel.block_manager.block_size,
            "processes": len(outputs), "distinct_outputs": len({tuple(o) for o in outputs}),
            "wall_s": time.monotonic() - t0}


def fork_benchmark(model_dir: Path, **kw) -> dict:
    runs = {mode: fork_run(model_dir, mode, **kw) for mode in ("fork", "independent", "independent-cached")}
    return {**runs, "ratio": runs["fork"]["peak_blocks"] / runs["independent"]["peak_blocks"]}


def fairness_real_run(model_dir: Path, policy: str, heavy: int = 60, light: int = 6, prompt_tokens: int = 64,
                      max_tokens: int = 64, seed: int = 0) -> dict:
    """The real kernel, two owners at t=0: "heavy" sends `heavy` requests, "light" `light` (10x fewer), four
    seats; prompt and output lengths uniform in [8, prompt_tokens] and [8, max_tokens]. Per step, each owner's
    served service (prefill tokens x 1 + decode tokens x 2, VTC's weights);
    returns the largest difference of cumulative service while both owners had unfinished requests, and
    the VTC bound 2U (`llmos.kernel.sched.vtc_bound`)."""
    kernel = Kernel(model_dir, KernelConfig(kv_memory="256MiB", policy=policy, max_num_seqs=4,
                                            max_num_batched_tokens=256, enable_prefix_cache=False))
    vocab = kernel.model_config.vocab_size
    rng = random.Random(seed)
    procs = [kernel.spawn(_ids(rng, rng.randint(8, prompt_tokens), vocab), _greedy(rng.randint(8, max_tokens)),
                          owner=owner) for owner, count in (("heavy", heavy), ("light", light)) for _ in range(count)]
    served = {"heavy": 0.0, "light": 0.0}
    done = {p.pid: 0 for p in procs}
    diffs = []
    while kernel.has_work():
        kernel.step()
        for p in procs:
            computed = p.num_computed_tokens if not p.is_finished else p.num_tokens
            prompt_part = min(computed, p.num_prompt_tokens)
            w = prompt_part + 2 * max(0, computed - p.num_prompt_tokens)
            if w > done[p.pid]:
                served[p.owner] += w - done[p.pid]
                done[p.pid] = w
        backlogged = {p.owner for p in procs if not p.is_finished}
        if len(backlogged) == 2:
            diffs.append(served["heavy"] - served["light"])
    bm = kernel.block_manager
    return {"policy": policy, "max_abs_diff": max(abs(d) for d in diffs) if diffs else 0.0, "diffs": diffs,
            "bound": vtc_bound(prompt_tokens, bm.num_blocks * bm.block_size)}


def priority_real_run(model_dir: Path, policy: str, batch: int = 16, batch_tokens: int = 96,
                      interactive_after_steps: int = 10, seed: int = 0) -> dict:
    """The real kernel with four seats: a batch job of `batch` long requests (nice 10) is running; after
    `interactive_after_steps` steps a short interactive request (nice -10) arrives. Returns its TTFT (s)."""
    kernel = Kernel(model_dir, KernelConfig(kv_memory="256MiB", policy=policy, max_num_seqs=4,
                                            max_num_batched_tokens=256, enable_prefix_cache=False))
    vocab = kernel.model_config.vocab_size
    rng = random.Random(seed)
    for _ in range(batch):
        kernel.spawn(_ids(rng, 64, vocab), _greedy(batch_tokens), owner="batch", nice=10)
    for _ in range(interactive_after_steps):
        kernel.step()
    p = kernel.spawn(_ids(rng, 16, vocab), _greedy(8), owner="alice", nice=-10)
    kernel.run_until_done([p.pid])
    return {"policy": policy, "ttft_s": p.first_token_time - p.arrival_time}


def run_kernel_benchmarks(out: Path, model: str = "llama-110m", sched_model: str = "default",
                          console: Console | None = None, quick: bool = False) -> dict:
    """Run every kernel benchmark, print the tables and write `kernel.json` and `kernel-section.md` into `out`."""
    console = console or Console()
    model_dir, sched_dir = resolve_model(model), resolve_model(sched_model)
    size = dict(system_tokens=200, question_tokens=8, requests=4, max_tokens=4) if quick else {}
    fsize = dict(prompt_tokens=64, max_tokens=8, n=4) if quick else {}
    results: dict = {"model": model, "sched_model": sched_model}
    with console.status("prefix cache: 16 requests sharing a system prompt, cache off then on"):
        results["prefix_cache"] = prefix_cache_benchmark(model_dir, **size)
    with console.status("fork: 8 continuations of one prompt, fork against independent processes"):
        results["fork"] = fork_benchmark(model_dir, **fsize)
    with console.status("scheduling: fairness and priority on the real kernel"):
        results["fairness"] = {pol: fairness_real_run(sched_dir, pol) for pol in ("fcfs", "fair")}
        results["priority"] = {pol: priority_real_run(sched_dir, pol) for pol in ("fcfs", "priority")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel.json").write_text(json.dumps(results, indent=1))
    section = kernel_section(results)
    if quick:
        section = ("A --quick smoke run on small sizes: the numbers show the benchmarks work, they are not "
                   "measurements, and the targets are not expected to be met.\n\n" + section)
    (out / "kernel-section.md").write_text(section)
    _print(results, console)
    return results


def kernel_section(r: dict) -> str:
    pc, fk, fa, pr = r["prefix_cache"], r["fork"], r["fairness"], r["priority"]
    n = fk["fork"]["processes"]
    lines = [
        "| benchmark | measured | target | met? |", "|---|---|---|---|",
        f"| prefix cache ({r['model']}): median TTFT of requests 2-{len(pc['on']['ttft_s'])}, cache off / on | "
        f"{pc['later_ttft_off_s'] * 1e3:.0f} ms / {pc['later_ttft_on_s'] * 1e3:.0f} ms = {pc['speedup']:.1f}x; "
        f"same outputs: {pc['same_outputs']}; hit rate {pc['on']['prefix_cache']['hit_rate']:.2f} | >= 5x, same outputs | "
        f"{'yes' if pc['speedup'] >= 5 and pc['same_outputs'] else 'no'} |",
        f"| fork ({r['model']}): peak KV blocks, n={n} forks / {n} independent processes | "
        f"{fk['fork']['peak_blocks']} / {fk['independent']['peak_blocks']} = {fk['ratio']:.3f} "
        f"({n} independent with the prefix cache: {fk['independent-cached']['peak_blocks']}) | <= 0.25 | "
        f"{'yes' if fk['ratio'] <= 0.25 else 'no'} |",
        f"| fairness ({r['sched_model']}, real kernel): max served-service difference while both owners are "
        f"backlogged, fcfs / fair | {fa['fcfs']['max_abs_diff']:.0f} / {fa['fair']['max_abs_diff']:.0f} "
        f"(bound 2U = {fa['fair']['bound']}) | fair within the bound, fcfs not | "
        f"{'yes' if fa['fair']['max_abs_diff'] <= fa['fair']['bound'] < fa['fcfs']['max_abs_diff'] else 'no'} |",
        f"| priority ({r['sched_model']}, real kernel): interactive TTFT, fcfs / priority | "
        f"{pr['fcfs']['ttft_s'] * 1e3:.0f} ms / {pr['priority']['ttft_s'] * 1e3:.0f} ms = "
        f"{pr['fcfs']['ttft_s'] / pr['priority']['ttft_s']:.1f}x | >= 5x | "
        f"{'yes' if pr['fcfs']['ttft_s'] >= 5 * pr['priority']['ttft_s'] else 'no'} |",
    ]
    return "\n".join(lines) + "\n"


def _print(r: dict, console: Console) -> None:
    table = Table(title="llmos kernel benchmarks")
    for col in ("benchmark", "measured", "target", "met?"):
        table.add_column(col)
    for line in kernel_section(r).splitlines()[2:]:
        table.add_row(*[c.strip() for c in line.strip("|").split("|")])
    console.print(table)
