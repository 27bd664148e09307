"""Scheduling policies side by side: `python benchmarks/scheduling.py [--out DIR] [--quick] [--no-real]`.

(a) fairness: owner A sends 10x the requests of owner B, both backlogged: fcfs vs fair (VTC, Sheng et al.,
    OSDI 2024); the largest service difference while both are backlogged against the VTC bound 2U.
(b) priority: a short interactive request (nice -10) arriving half way through a long batch job (nice 10):
    its time to first token (TTFT) under fcfs vs priority.
Both on the deterministic simulation (llmos.bench.sim: the real Scheduler, BlockManager and Processes on a
virtual clock), plus (b) once on the real kernel with the bundled default model.
Writes results.json and benchmarks-section.md to --out, sched-fairness.png and sched-priority.png to --img-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmos.bench.sim import SimConfig, fairness_experiment, priority_experiment

QUICK_SIM = SimConfig(num_blocks=128, block_size=16, max_num_seqs=8, max_num_batched_tokens=256)
QUICK_FAIR = dict(light_requests=40, duration_s=8.0, prompt_tokens=(16, 128), output_tokens=(16, 128))
QUICK_PRIO = dict(batch_requests=24, batch_prompt_tokens=64, batch_output_tokens=(32, 96))


def real_priority_run(policy: str, batch_requests: int, prompt_tokens: int, output_tokens: tuple[int, int],
                      interactive_after_steps: int | None, max_num_seqs: int = 8, seed: int = 0) -> dict:
    """Experiment (b) on the real kernel (bundled default model, CPU, greedy, EOS ignored): `batch_requests`
    processes at nice 10 (output lengths uniform in `output_tokens`, random.Random(seed)), then after
    `interactive_after_steps` steps one 16-token prompt at nice -10 asking for 8 tokens. The kernel's
    scheduler is replaced by one with `policy` before anything is spawned.
    With interactive_after_steps=None, only the batch runs (to count its steps). Times: time.monotonic."""
    from llmos.fs.registry import default_model_dir
    from llmos.kernel.kernel import Kernel, KernelConfig
    from llmos.model.sampling import SamplingParams

    k = Kernel(default_model_dir(), KernelConfig(kv_memory="64MiB", max_num_seqs=max_num_seqs,
                                                  max_num_batched_tokens=256, device="cpu", policy=policy))
    rng = random.Random(seed)
    vocab = k.model_config.vocab_size
    start = time.monotonic()
    batch = []
    for _ in range(batch_requests):
        params = SamplingParams(max_tokens=rng.randint(*output_tokens), temperature=0.0, ignore_eos=True)
        p = k.spawn([rng.randrange(100, vocab) for _ in range(prompt_tokens)], params, owner="batch")
        k.scheduler.renice(p, 10)
        batch.append(p)
    steps, interactive, preempted, arrival_step, first_step = 0, None, 0, None, None
    while k.has_work():
        if interactive is None and interactive_after_steps is not None and steps == interactive_after_steps:
            interactive = k.spawn([rng.randrange(100, vocab) for _ in range(16)],
                                  SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), owner="interactive")
            k.scheduler.renice(interactive, -10)
            arrival_step = steps
        before = sum(p.num_preemptions for p in batch)
        k.step()
        steps += 1
        preempted += sum(p.num_preemptions for p in batch) - before
        if first_step is None and interactive is not None and interactive.first_token_time is not None:
            first_step = steps
    out = {"policy": policy, "steps": steps, "batch_makespan_s": max(p.finish_time for p in batch) - start,
           "batch_preemptions": preempted}
    if interactive is not None:
        out.update(interactive_ttft_s=interactive.first_token_time - interactive.arrival_time,
                   interactive_steps_to_first_token=first_step - arrival_step, interactive_arrival_step=arrival_step)
    return out


def _downsample(series: dict, points: int = 2000) -> dict:
    stride = max(1, len(series["t"]) // points)
    return {key: values[::stride] for key, values in series.items()}


def plot(results: dict, img_dir: Path) -> list[Path] | str:
    """sched-fairness.png (per-owner service, and |A - B| while both are backlogged against 2U) and
    sched-priority.png (interactive TTFT per policy). Returns the files, or a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart"
    img_dir.mkdir(parents=True, exist_ok=True)
    files = []
    fair = results["fairness"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (name, r) in enumerate(fair.items()):
        s = r["series"]
        left.plot(s["t"], s["A"], color=f"C{i}", label=f"{name}: owner A (10x requests)")
        left.plot(s["t"], s["B"], color=f"C{i}", linestyle="--", label=f"{name}: owner B")
        diff = [float("nan") if d is None else d for d in s["diff_since_backlogged"]]
        right.plot(s["t"], diff, color=f"C{i}", label=f"{name}: largest over any interval {r['max_diff']:,.0f}")
    bound = next(iter(fair.values()))["bound"]
    right.axhline(bound, color="k", linestyle=":", label=f"VTC bound ±2U = ±{bound:,.0f}")
    right.axhline(-bound, color="k", linestyle=":")
    right.set_ylim(-1.5 * bound, 3 * bound)
    left.set_xlabel("virtual time (s)")
    left.set_ylabel("weighted tokens served (prefill x1, decode x2)")
    left.set_title("service per owner")
    left.legend(fontsize=8)
    right.set_xlabel("virtual time (s)")
    right.set_ylabel("gain of A - gain of B (weighted tokens)")
    right.set_title("service difference since both owners became backlogged")
    right.legend(fontsize=8)
    fig.tight_layout()
    files.append(img_dir / "sched-fairness.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    groups = [("simulation", results["priority"])]
    if "real" in results and "error" not in results["real"]:
        groups.append(("real kernel (default model, CPU)", results["real"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (title, runs) in zip(axes[0], groups):
        names = list(runs)
        ttft = [runs[n]["interactive_ttft_s"] * 1000 for n in names]
        bars = ax.bar(names, ttft, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, [f"{v:,.0f} ms" if v >= 10 else f"{v:.1f} ms" for v in ttft])
        ax.set_yscale("log")
        ax.set_ylabel("interactive request TTFT (ms, log)")
        ax.set_title(title)
    fig.suptitle("a nice -10 request arriving during a nice 10 batch job")
    fig.tight_layout()
    files.append(img_dir / "sched-priority.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def print_tables(results: dict, console: Console) -> None:
    t = Table(title="(a) fairness: owner A sends 10x the requests of owner B (simulation)")
    for col in ("policy", "requests A/B", "served A", "served B", "both backlogged", "max |A-B|", "2U bound", "within"):
        t.add_column(col, justify="right")
    for name, r in results["fairness"].items():
        t.add_row(name, f"{r['requests']['A']}/{r['requests']['B']}", f"{r['served']['A']:,.0f}",
                  f"{r['served']['B']:,.0f}", f"{r['both_backlogged_s']:.1f} s", f"{r['max_diff']:,.0f}",
                  f"{r['bound']:,.0f}", "yes" if r["within_bound"] else "no")
    console.print(t)
    t = Table(title="(b) priority: an interactive request (nice -10) during a batch job (nice 10)")
    for col in ("run", "policy", "TTFT", "fcfs / this", "batch makespan", "preemptions"):
        t.add_column(col, justify="right")
    groups = [("simulation", results["priority"])]
    if "real" in results and "error" not in results["real"]:
        groups.append(("real kernel", results["real"]))
    for run_name, runs in groups:
        base = runs["fcfs"]["interactive_ttft_s"]
        for name, r in runs.items():
            pre = (", ".join(f"{v} ({k})" for k, v in r["preemptions"].items()) or "0") if "preemptions" in r \
                else str(r["batch_preemptions"])
            ttft = r["interactive_ttft_s"]
            t.add_row(run_name, name, f"{ttft * 1000:,.1f} ms", f"{base / ttft:.1f}x",
                      f"{r['batch_makespan_s']:.2f} s", pre)
    console.print(t)
    if "real" in results and "error" in results["real"]:
        console.print(f"real run skipped: {results['real']['error']}")


def render_markdown(results: dict) -> str:
    f, p = results["fairness"], results["priority"]
    lines = [f"Command: `{results['command']}` on {results['machine']}.", "",
             "| (a) policy | served A | served B | max \\|A-B\\| while both backlogged | VTC bound 2U |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['served']['A']:,.0f} | {r['served']['B']:,.0f} | {r['max_diff']:,.0f} | {r['bound']:,.0f} |"
              for n, r in f.items()]
    lines += ["", "| (b) run | policy | interactive TTFT | batch makespan |", "|---|---|---|---|"]
    groups = [("simulation", p)]
    if "error" not in results.get("real", {"error": "not run"}):
        groups.append(("real kernel", results["real"]))
    for g, runs in groups:
        lines += [f"| {g} | {n} | {r['interactive_ttft_s'] * 1000:,.1f} ms | {r['batch_makespan_s']:.2f} s |"
                  for n, r in runs.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results-sched"), help="results directory")
    ap.add_argument("--img-dir", type=Path, default=Path("docs/img"), help="where the two PNGs go")
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds; what the tests run)")
    ap.add_argument("--no-real", action="store_true", help="skip the run on the real kernel")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file; give a directory")
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console()
    config = QUICK_SIM if args.quick else SimConfig()
    fair_kw, prio_kw = (QUICK_FAIR, QUICK_PRIO) if args.quick else ({}, {})
    results = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
                          f"Python {platform.python_version()}",
               "sim_config": vars(config)}
    results["fairness"] = {n: fairness_experiment(n, config, **fair_kw) for n in ("fcfs", "fair")}
    results["priority"] = {n: priority_experiment(n, config, **prio_kw) for n in ("fcfs", "priority")}
    if not args.no_real:
        size = dict(batch_requests=16, prompt_tokens=32, output_tokens=(24, 48)) if args.quick else \
            dict(batch_requests=32, prompt_tokens=64, output_tokens=(64, 160))
        try:
            alone = real_priority_run("fcfs", interactive_after_steps=None, **size)
            results["real"] = {n: real_priority_run(n, interactive_after_steps=alone["steps"] // 2, **size)
                               for n in ("fcfs", "priority")}
            results["real"]["fcfs"]["batch_alone_steps"] = alone["steps"]
        except Exception as e:  # the real run is a bonus: report, do not lose the simulation
            results["real"] = {"error": f"{type(e).__name__}: {e}"}
    print_tables(results, console)
    charts = plot(results, args.img_dir)
    for r in results["fairness"].values():
        r["series"] = _downsample(r["series"])
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "benchmarks-section.md").write_text(render_markdown(results))
    console.print(f"wrote {args.out / 'results.json'}, {args.out / 'benchmarks-section.md'}"
                  + (f", {', '.join(str(p) for p in charts)}" if isinstance(charts, list) else f" ({charts})"))
    ok_a = results["fairness"]["fair"]["within_bound"] and not results["fairness"]["fcfs"]["within_bound"]
    ratio = results["priority"]["fcfs"]["interactive_ttft_s"] / results["priority"]["priority"]["interactive_ttft_s"]
    console.print(f"claim (a) fair within the VTC bound, fcfs not: {'holds' if ok_a else 'FAILS'}; "
                  f"claim (b) TTFT fcfs/priority = {ratio:.1f}x (>= 5x: {'holds' if ratio >= 5 else 'FAILS'})")
    return 0 if ok_a and ratio >= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
