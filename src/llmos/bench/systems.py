"""The systems under test. Each job runs alone in a fresh Python process: `python -m llmos.bench.systems SPEC OUT`.

Owns the timed loops (llmos's kernel, transformers' `generate` and continuous batching, batch-1 decode, copy
bandwidth) and what they record: output token ids, per-token times, wall time, peak RSS. Never summarizes or
compares (serving.py and report.py do); progress goes to stdout as JSON lines, everything else to stderr.

Accounting: `generated_tokens` is every token a system computed, padding and overrun included (the peers'
generous count); the parent derives useful tokens from `requests[i]["output_ids"]` and the requested lengths.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from llmos.errors import LlmosError

SERVING_SYSTEMS = ("llmos", "hf-sequential", "hf-static", "hf-continuous", "hf-continuous-exact")
JOBS = SERVING_SYSTEMS + ("llmos-decode", "hf-decode", "bandwidth")
PAD_ID = 0  # left padding for the static batch; masked out, so any id would do


class Progress:
    """Writes `{"done": d, "total": t}` lines for the parent's progress bar, at most every 0.2 s."""

    def __init__(self, stream) -> None:
        self.stream, self.last = stream, 0.0

    def __call__(self, done: int, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= 0.2:
            self.stream.write(json.dumps({"done": done, "total": total}) + "\n")
            self.stream.flush()
            self.last = now


# ---- llmos ----------------------------------------------------------------------------------------------


def _kernel(spec: dict):
    from llmos.kernel.kernel import Kernel, KernelConfig

    return Kernel(spec["model_dir"], KernelConfig(device="cpu", dtype="float32", **spec.get("kernel", {})))


def _greedy(n: int):
    from llmos.model.sampling import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def run_llmos(spec: dict, progress: Progress) -> dict:
    """All requests spawned at t0, `step()` until idle. Strict: only the kernel's own outputs are counted."""
    kernel = _kernel(spec)
    requests = spec["requests"]
    kernel.spawn(requests[0][0][:8], _greedy(2))  # warm-up (untimed): one prefill and one decode
    kernel.run_until_done()
    total, steps0 = sum(n for _, n in requests), kernel.steps
    t0 = time.monotonic()
    procs = [kernel.spawn(ids, _greedy(n)) for ids, n in requests]
    while kernel.has_work():
        kernel.step()
        progress(sum(p.num_output_tokens for p in procs), total)
    wall = time.monotonic() - t0
    rows = [{"output_ids": p.output_token_ids, "ttft_s": p.first_token_time - p.arrival_time,
             "token_times": [t - t0 for t in kernel.streams[p.pid].token_times]} for p in procs]
    c = kernel.config
    return {"wall_s": wall, "generated_tokens": sum(len(p.output_token_ids) for p in procs), "requests": rows,
            "notes": f"Kernel: kv_memory={c.kv_memory} (a pool of {kernel.pool.nbytes / 2**20:.0f} MiB), "
                     f"block_size={c.block_size}, max_num_seqs={c.max_num_seqs}, "
                     f"max_num_batched_tokens={c.max_num_batched_tokens}; {kernel.steps - steps0} steps",
            "preemptions": sum(p.num_preemptions for p in procs)}


def run_llmos_decode(spec: dict, progress: Progress) -> dict:
    """Batch-1 decode: one request with a `decode_context`-token prompt, `decode_steps` decodes after the prefill;
    best of `repeats`. Also the weight bytes one decode step reads (see `weight_bytes_per_token`)."""
    kernel = _kernel(spec)
    prompt, steps = spec["decode_prompt"], spec["decode_steps"]
    kernel.spawn(prompt[:8], _greedy(2))
    kernel.run_until_done()
    rates = []
    for i in range(spec["repeats"]):
        p = kernel.spawn(prompt, _greedy(steps + 1))
        kernel.run_until_done()
        times = kernel.streams[p.pid].token_times
        rates.append((len(times) - 1) / (times[-1] - times[0]))
        progress(i + 1, spec["repeats"], force=True)
    return {"tokens_per_s": max(rates), "all_tokens_per_s": rates, "output_ids": p.output_token_ids,
            "weight_bytes": weight_bytes_per_token(kernel.model), "num_parameters": num_parameters(kernel.model)}


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied embedding once, as the LM head),
    except embedding tables that are only gathered (an untied input embedding, GPT-2's position table): those
    read one row per token, which is left out."""
    lm_head = getattr(model, "lm_head", None)
    head_weight = lm_head.weight if lm_head is not None else None
    gathered = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head_weight]
    gathered_ids = {id(w) for w in gathered}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in gathered_ids)


def run_bandwidth(spec: dict, progress: Progress) -> dict:
    """Memory bandwidth, two ways, best of 5 each, on a `bandwidth_mib` fp32 tensor:

    - copy: src -> dst, counted as memory traffic, bytes read + bytes written over the time (the
      roofline's bandwidth, as the issue defines it: "weight bytes read per token divided by measured
      copy bandwidth");
    - read: a sum over src, bytes read over the time; a decode step only reads weights, so this is the
      stricter reference.
    Both tensors are written first, so no page is the shared zero page."""
    n = spec["bandwidth_mib"] * 2**20 // 4
    src, dst = torch.ones(n), torch.zeros(n)
    dst.copy_(src)
    best = best_read = float("inf")
    for i in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        best_read = min(best_read, time.perf_counter() - t)
        progress(i + 1, 5, force=True)
    return {"bytes_per_s": 2 * src.nbytes / best, "read_bytes_per_s": src.nbytes / best_read, "copy_bytes": src.nbytes}


# ---- transformers ---------------------------------------------------------------------------------------


class TokenClock:
    """A `generate` streamer that records when each step's tokens arrive (the first `put` is the prompt)."""

    def __init__(self, on_token=None) -> None:
        self.times: list[float] = []
        self.prompt_seen = False
        self.on_token = on_token

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if self.on_token:
            self.on_token()

    def end(self) -> None:
        pass


def _hf_model(spec: dict, attn: str = "sdpa"):
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation=attn)
    model.generation_config.eos_token_id = None  # EOS ignored: neither stops nor is masked (as llmos ignore_eos)
    return model.eval()


def _hf_config(n: int):
    """Greedy, exactly `n` new tokens: no EOS token, so nothing stops early (min_new_tokens states the intent)."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                            pad_token_id=PAD_ID)


def _hf_generate(model, batch: list[list[int]], n: int, clock: TokenClock) -> list[list[int]]:
    """Left-padded greedy `generate` of `n` tokens for every row; returns each row's new tokens."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[PAD_ID] * (width - len(ids)) + ids for ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    out = model.generate(input_ids, attention_mask=mask, generation_config=_hf_config(n), streamer=clock)
    return out[:, width:].tolist()


def run_hf_sequential(spec: dict, progress: Progress) -> dict:
    """transformers `generate`, one request at a time, in order; TTFT counts the wait behind earlier requests."""
    model = _hf_model(spec)
    requests = spec["requests"]
    _hf_generate(model, [requests[0][0][:8]], 2, TokenClock())  # warm-up (untimed)
    total, done = sum(n for _, n in requests), 0

    def tick():
        nonlocal done
        done += 1
        progress(done, total)

    rows = []
    t0 = time.perf_counter()
    for ids, n in requests:
        clock = TokenClock(tick)
        out = _hf_generate(model, [ids], n, clock)[0]
        rows.append({"output_ids": out, "ttft_s": clock.times[0] - t0, "token_times": [t - t0 for t in clock.times]})
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "generated_tokens": sum(len(r["output_ids"]) for r in rows), "requests": rows,
            "notes": f"generate, batch 1, attn_implementation={model.config._attn_implementation}"}


def run_hf_static(spec: dict, progress: Progress) -> dict:
    """transformers `generate` on one left-padded batch of all requests, every row run to the longest output.
    Every row gets its first token when the batch's prefill ends; generated tokens = rows x longest output."""
    model = _hf_model(spec)
    requests = spec["requests"]
    _hf_generate(model, [ids[:8] for ids, _ in requests[:2]], 2, TokenClock())
    longest = max(n for _, n in requests)
    steps = 0

    def tick():
        nonlocal steps
        steps += 1
        progress(steps, longest)

    clock = TokenClock(tick)
    t0 = time.perf_counter()
    outs = _hf_generate(model, [ids for ids, _ in requests], longest, clock)
    wall = time.perf_counter() - t0
    times = [t - t0 for t in clock.times]
    rows = [{"output_ids": out, "ttft_s": times[0], "token_times": times[:len(out)]} for out in outs]
    return {"wall_s": wall, "generated_tokens": sum(len(out) for out in outs), "requests": rows,
            "notes": f"generate, one batch of {len(requests)}, left padding, all rows run to {longest} tokens, "
                     f"attn_implementation={model.config._attn_implementation}"}


def run_hf_continuous(spec: dict, progress: Progress, exact: bool = False) -> dict:
    """transformers continuous batching (paged KV cache): the `ContinuousBatchingManager` that `generate_batch`
    drives, created, warmed up and started exactly as `generate_batch` does, but before the clock starts (setup
    is reported as `setup_s`, not timed). `generate_batch` takes one `max_new_tokens` for all requests, so every
    request runs to the longest output and the overrun counts as generated; `exact` gives each request its own
    length through `add_request(max_new_tokens=...)` instead."""
    from transformers.generation.continuous_batching.continuous_api import WorkloadHints

    model = _hf_model(spec)
    requests = spec["requests"]
    longest = max(n for _, n in requests)
    config = _hf_config(longest)
    config.min_new_tokens = None
    hints = WorkloadHints(max_prompt_length=max(len(ids) for ids, _ in requests), max_generated_length=longest,
                          num_requests=len(requests))
    t_setup = time.perf_counter()
    manager = model.init_continuous_batching(generation_config=config, workload_hints=hints)
    manager.warmup()
    manager.start()
    setup = time.perf_counter() - t_setup
    try:
        total = sum(n for _, n in requests) if exact else longest * len(requests)
        t0 = time.perf_counter()
        if exact:
            ids_ = [manager.add_request(ids, max_new_tokens=n, record_timestamps=True, eos_token_id=-1)
                    for ids, n in requests]
        else:
            ids_ = manager.add_requests([ids for ids, _ in requests], max_new_tokens=longest, record_timestamps=True)
        results, done = {}, 0
        while len(results) < len(requests):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("the continuous batching thread stopped before finishing every request")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"continuous batching request {result.request_id} failed: {result.error}")
                results[result.request_id] = result
                done += len(result.generated_tokens)
                progress(done, total)
        wall = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
    rows = []
    for rid in ids_:
        r = results[rid]
        times = [t - t0 for t in r.timestamps]
        rows.append({"output_ids": list(r.generated_tokens), "ttft_s": times[0], "token_times": times})
    cb = manager.continuous_batching_config
    return {"wall_s": wall, "setup_s": setup, "generated_tokens": sum(len(r["output_ids"]) for r in rows),
            "requests": rows,
            "notes": ("add_request with per-request max_new_tokens" if exact else
                      f"generate_batch semantics: max_new_tokens={longest} for all")
                     + f", attn_implementation={model.config._attn_implementation}, page_size={cb.page_size}, "
                       f"num_blocks={cb.num_blocks}, max_batch_tokens={cb.max_batch_tokens}, "
                       f"setup (init + warmup, untimed) {setup:.1f} s"}


def run_hf_decode(spec: dict, progress: Progress) -> dict:
    """transformers batch-1 decode, measured like `run_llmos_decode` (steps after the prefill, best of repeats)."""
    model = _hf_model(spec)
    prompt, steps = spec["decode_prompt"], spec["decode_steps"]
    _hf_generate(model, [prompt[:8]], 2, TokenClock())
    rates = []
    for i in range(spec["repeats"]):
        clock = TokenClock()
        out = _hf_generate(model, [prompt], steps + 1, clock)[0]
        rates.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
        progress(i + 1, spec["repeats"], force=True)
    return {"tokens_per_s": max(rates), "all_tokens_per_s": rates, "output_ids": out}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec; `ru_maxrss` would not
    (it keeps the forking parent's peak), so it is only the fallback elsewhere (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


RUNNERS = {
    "llmos": run_llmos, "hf-sequential": run_hf_sequential, "hf-static": run_hf_static,
    "hf-continuous": run_hf_continuous,
    "hf-continuous-exact": lambda spec, progress: run_hf_continuous(spec, progress, exact=True),
    "llmos-decode": run_llmos_decode, "hf-decode": run_hf_decode, "bandwidth": run_bandwidth,
}


def main(argv: list[str] | None = None) -> None:
    """Run the job in SPEC (JSON) and write its result (JSON) to OUT; stdout carries only progress lines."""
    spec_path, out_path = argv or sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    progress_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints (library banners) go to the log, not into the progress protocol
    torch.set_num_threads(spec["threads"])
    try:
        with torch.inference_mode():
            result = RUNNERS[spec["job"]](spec, Progress(progress_stream))
    except LlmosError as e:  # bad input (a kernel setting, the checkpoint): the parent reports it as such
        print(f"error: {e}", file=sys.stderr)
        Path(out_path).write_text(json.dumps({"user_error": str(e)}))
        sys.exit(2)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["threads"] = torch.get_num_threads()
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
