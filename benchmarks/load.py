"""The daemon under load: N concurrent streaming clients against `llmos serve` (a subprocess on loopback) for a
bounded time, each sending one short streamed chat or text completion after another.

    python benchmarks/load.py --clients 200 --duration 60            # the issue-4 run (bundled model "default")
    python benchmarks/load.py --clients 8 --duration 5 --model DIR   # a smoke run

Reports requests completed, failures (every request here is within quota: the daemon runs in single-user mode, so
any failure is a daemon fault), output tokens/s, time to first token and end-to-end latency p50/p95/p99, the
daemon's resident memory (psutil RSS) at the start, the middle and the end, and the KV blocks still in use once the
clients are done (from /v1/memory; must be 0). Writes results.json and section.md to --out (default
benchmarks/results-load/) and a plot of throughput and latency over time to --img (default docs/img/load.png).
Clients and daemon share the machine: on a small one the clients' own CPU use is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

QUESTIONS = [
    "What is an operating system?",
    "Tell me a short story about a fox.",
    "Why is the sky blue?",
    "Write one line of Python.",
    "Name three colours.",
    "How do computers add numbers?",
    "What is a process?",
    "Say hello in French.",
]


@dataclass
class Request:
    """One streamed request as the client saw it; times in seconds from the start of the run."""

    client: int
    api: str
    start: float
    first_token: float | None = None
    end: float | None = None
    tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None


@dataclass
class Run:
    requests: list[Request] = field(default_factory=list)
    chunk_seconds: dict[int, int] = field(default_factory=dict)  # second of the run -> SSE chunks with text
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)


# ---- the daemon ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(model: str, home: Path, port: int, kv_memory: str, log: Path,
                 threads: int | None) -> subprocess.Popen:
    """`llmos serve` on 127.0.0.1:port with LLMOS_HOME=home, `model` preloaded (torch on `threads` threads; None:
    torch's default); returns once /health answers."""
    cmd = [sys.executable, "-m", "llmos.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", model, "--kv-memory", kv_memory, "--keep-alive", "-1", "--log-level", "warning"]
    env = {**os.environ, "LLMOS_HOME": str(home)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with {proc.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["models"]:
                return proc
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the daemon did not come up in 180 s; see {log}")


# ---- the clients --------------------------------------------------------------------------------------------------


def request_body(api: str, model: str, question: str, max_tokens: int, seed: int) -> tuple[str, dict]:
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": True,
              "stream_options": {"include_usage": True}}
    if api == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": question}]}
    return "/v1/completions", {**common, "prompt": question}


async def one_request(http: httpx.AsyncClient, run: Run, t0: float, client: int, api: str, model: str,
                      max_tokens: int, n: int) -> Request:
    path, body = request_body(api, model, QUESTIONS[(client + n) % len(QUESTIONS)], max_tokens, client * 100_003 + n)
    req = Request(client, api, time.monotonic() - t0)
    try:
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                req.error = f"{r.status_code} {(await r.aread())[:200]!r}"
                return req
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    req.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    text = choice["delta"].get("content") if api == "chat" else choice["text"]
                    if text:
                        now = time.monotonic() - t0
                        if req.first_token is None:
                            req.first_token = now
                        run.chunk_seconds[int(now)] = run.chunk_seconds.get(int(now), 0) + 1
            if not done:
                req.error = "stream ended without [DONE]"
                return req
        req.end = time.monotonic() - t0
    except httpx.HTTPError as e:
        req.error = f"{type(e).__name__}: {e}"
    return req


async def client_loop(http: httpx.AsyncClient, run: Run, t0: float, deadline: float, client: int, model: str,
                      max_tokens: int) -> None:
    api = "chat" if client % 2 == 0 else "completions"
    n = 0
    while time.monotonic() < deadline:
        run.requests.append(await one_request(http, run, t0, client, api, model, max_tokens, n))
        n += 1


async def sample_rss(proc: psutil.Process, run: Run, t0: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        run.rss.append((time.monotonic() - t0, proc.memory_info().rss))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def drive(url: str, pid: int, model: str, clients: int, duration: float, max_tokens: int) -> Run:
    run = Run()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    timeout = httpx.Timeout(300.0, connect=60.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        t0 = time.monotonic()
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(psutil.Process(pid), run, t0, stop))
        await asyncio.gather(*(client_loop(http, run, t0, t0 + duration, c, model, max_tokens)
                               for c in range(clients)))
        run.rss.append((time.monotonic() - t0, psutil.Process(pid).memory_info().rss))
        stop.set()
        await sampler
    return run


def blocks_after(url: str, model: str, wait_s: float = 10.0) -> tuple[int, int]:
    """(used KV blocks, live processes) once they reach 0 or after `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        mem = httpx.get(url + "/v1/memory", timeout=10).json()["models"][model]
        used, live = mem["used_blocks"], sum(o["processes"] for o in mem["owners"].values())
        if (used == 0 and live == 0) or time.monotonic() > deadline:
            return used, live
        time.sleep(0.2)


# ---- the peer: the same kernel without HTTP ----------------------------------------------------------------------


def kernel_reference(model: str, requests: int, max_tokens: int, kv_memory: str, threads: int | None,
                     repeats: int = 3) -> dict:
    """The request mix of the clients (half chat through the chat template, half plain prompts, same seeds), all
    spawned at t=0 on an in-process Kernel configured as `llmos serve` configures it, stepped until idle, best of
    `repeats` runs: the throughput the daemon would have if HTTP, asyncio and the clients cost nothing."""
    from llmos.fs.registry import resolve_model
    from llmos.kernel.kernel import Kernel, KernelConfig
    from llmos.model.sampling import SamplingParams
    from llmos.server.openai_api import chat_prompt

    if threads:
        import torch

        torch.set_num_threads(threads)
    path = Path(model) if Path(model).is_dir() else resolve_model(model)
    kernel = Kernel(path, KernelConfig(kv_memory=kv_memory, swap_memory="256MiB", policy="fair"))
    tok = kernel.tokenizer
    prompts = []
    for client in range(requests):
        question = QUESTIONS[client % len(QUESTIONS)]
        prompts.append(chat_prompt([{"role": "user", "content": question}], tok) if client % 2 == 0
                       else tok.encode(question))
    kernel.spawn(prompts[0], SamplingParams(max_tokens=2))  # warm-up, as the daemon's first request
    kernel.run_until_done()
    best = None
    for _ in range(repeats):  # best of `repeats`: the machine may be shared
        t0 = time.perf_counter()
        procs = [kernel.spawn(ids, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=client * 100_003))
                 for client, ids in enumerate(prompts)]
        kernel.run_until_done()
        wall = time.perf_counter() - t0
        if best is None or wall < best[0]:
            best = (wall, sum(p.num_output_tokens for p in procs), [p.first_token_time - p.arrival_time for p in procs])
    wall, tokens, ttft = best
    return {"requests": requests, "output_tokens": tokens, "wall_s": round(wall, 2), "best_of": repeats,
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1)}


# ---- the report ---------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation, or None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(run: Run, duration: float, blocks: tuple[int, int]) -> dict:
    ok = [r for r in run.requests if r.ok]
    failed = [r for r in run.requests if not r.ok]
    wall = max((r.end for r in ok), default=duration)
    ttft = [r.first_token - r.start for r in ok if r.first_token is not None]
    e2e = [r.end - r.start for r in ok]
    tokens = sum(r.tokens for r in ok)
    rss = run.rss
    middle = min(rss, key=lambda x: abs(x[0] - duration / 2)) if rss else (0, 0)
    ms = lambda xs, q: None if percentile(xs, q) is None else round(percentile(xs, q) * 1000, 1)  # noqa: E731
    return {
        "requests_completed": len(ok), "failures": len(failed),
        "failure_examples": sorted({r.error for r in failed})[:5],
        "output_tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(ok) / wall, 2),
        "ttft_ms": {q: ms(ttft, q) for q in (50, 95, 99)}, "e2e_ms": {q: ms(e2e, q) for q in (50, 95, 99)},
        "rss_mib": {"start": round(rss[0][1] / 2**20, 1) if rss else None, "middle": round(middle[1] / 2**20, 1),
                    "end": round(rss[-1][1] / 2**20, 1) if rss else None},
        "kv_blocks_used_after": blocks[0], "live_processes_after": blocks[1],
    }


def machine(threads: int | None) -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({threads or torch.get_num_threads()} threads)")


def table(s: dict, args: argparse.Namespace) -> str:
    rows = [
        ("clients", f"{args.clients}"), ("duration", f"{args.duration:.0f} s (+ in-flight requests: {s['wall_s']} s)"),
        ("requests completed", f"{s['requests_completed']:,} ({s['requests_per_s']}/s)"),
        ("failures", f"{s['failures']}"),
        ("output tokens", f"{s['output_tokens']:,} ({s['tokens_per_s']} tokens/s)"),
        ("TTFT p50 / p95 / p99", " / ".join(f"{s['ttft_ms'][q]:,} ms" for q in (50, 95, 99))),
        ("end-to-end p50 / p95 / p99", " / ".join(f"{s['e2e_ms'][q]:,} ms" for q in (50, 95, 99))),
        ("daemon RSS start / middle / end", " / ".join(f"{s['rss_mib'][k]:,} MiB" for k in ("start", "middle", "end"))),
        ("KV blocks used after the run", f"{s['kv_blocks_used_after']} (live processes: {s['live_processes_after']})"),
    ]
    if s.get("kernel_reference"):
        k = s["kernel_reference"]
        rows.append(("peer: the kernel in-process, no HTTP", f"{k['tokens_per_s']} tokens/s ({k['requests']} requests "
                     f"at t=0, {k['output_tokens']:,} tokens in {k['wall_s']} s, best of {k['best_of']})"))
        rows.append(("daemon / in-process kernel", f"{s['tokens_per_s'] / k['tokens_per_s']:.2f}x"))
    return "\n".join(["| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def plot(run: Run, duration: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in run.requests if r.ok]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    bin_s = 2
    per_bin: dict[int, int] = {}
    for r in ok:
        per_bin[int(r.end // bin_s)] = per_bin.get(int(r.end // bin_s), 0) + r.tokens
    bins = range(max(per_bin, default=0) + 1)
    a.plot([(b + 0.5) * bin_s for b in bins], [per_bin.get(b, 0) / bin_s for b in bins], lw=1.2)
    a.set_xlabel(f"time (s), by the request's end, {bin_s} s bins")
    a.set_ylabel("output tokens/s")
    a.set_title("throughput")
    a.set_ylim(bottom=0)
    window = 5
    starts = list(range(0, int(max((r.end for r in ok), default=duration)) + 1, window))
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        for name, value, colour in (("TTFT", lambda r: r.first_token - r.start, "tab:orange"),
                                    ("end-to-end", lambda r: r.end - r.start, "tab:blue")):
            xs, ys = [], []
            for s in starts:
                vals = [value(r) for r in ok if s <= r.end < s + window and r.first_token is not None]
                if vals:
                    xs.append(s + window / 2)
                    ys.append(percentile(vals, q))
            b.plot(xs, ys, style, color=colour, lw=1.2, label=f"{name} p{q}")
    b.set_xlabel("time (s), by the request's end, 5 s windows")
    b.set_ylabel("seconds")
    b.set_title("latency percentiles")
    b.set_ylim(bottom=0)
    b.legend(fontsize=7, ncol=3, loc="lower center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200, help="concurrent streaming clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds during which clients start requests")
    parser.add_argument("--model", default="default", help="a model name or checkpoint directory (default: bundled)")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request at most")
    parser.add_argument("--kv-memory", default="256MiB", help="the daemon's KV pool")
    parser.add_argument("--threads", type=int, default=None, help="the daemon's torch threads (OMP_NUM_THREADS) "
                        "and the in-process peer's; default: torch's own (one per core)")
    parser.add_argument("--no-reference", action="store_true", help="skip the in-process kernel run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results-load")
    parser.add_argument("--img", type=Path, default=Path(__file__).parent.parent / "docs" / "img" / "load.png")
    args = parser.parse_args()
    if args.clients < 1 or args.duration <= 0:
        raise SystemExit("--clients must be >= 1 and --duration > 0")

    args.out.mkdir(parents=True, exist_ok=True)
    load_before = round(os.getloadavg()[0], 2)
    home = Path(tempfile.mkdtemp(prefix="llmos-load-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_daemon(args.model, home, port, args.kv_memory, args.out / "daemon.log", args.threads)
    try:
        model = httpx.get(url + "/health").json()["models"][0]
        warm = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}, timeout=60)
        warm.raise_for_status()
        print(f"daemon pid {proc.pid} on {url}, model {model}; {args.clients} clients for {args.duration:.0f} s",
              file=sys.stderr)
        run = asyncio.run(drive(url, proc.pid, model, args.clients, args.duration, args.max_tokens))
        blocks = blocks_after(url, model)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(home, ignore_errors=True)

    summary = summarize(run, args.duration, blocks)
    summary["load_average_before"] = load_before
    if not args.no_reference:
        print(f"the same kernel in-process: {args.clients} requests at t=0", file=sys.stderr)
        summary["kernel_reference"] = kernel_reference(args.model, args.clients, args.max_tokens, args.kv_memory,
                                                       args.threads)
    command = "python benchmarks/load.py " + " ".join(sys.argv[1:])
    md = "\n\n".join([f"Command: `{command}` on {machine(args.threads)}; load average {load_before} before the run.",
                       table(summary, args)])
    print(md)
    (args.out / "section.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps({
        "command": command, "machine": machine(args.threads), "args": {k: str(v) for k, v in vars(args).items()},
        "summary": summary, "rss": run.rss, "chunk_seconds": run.chunk_seconds,
        "requests": [asdict(r) for r in run.requests]}, indent=1))
    with contextlib.suppress(ImportError):
        plot(run, args.duration, args.img)
    if summary["failures"] or summary["kv_blocks_used_after"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
