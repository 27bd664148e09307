"""Benchmark results -> numbers, tables, `results.json`, a bar chart and the `docs/benchmarks.md` section.

Owns the accounting: llmos counted strictly (only tokens a request asked for), each transformers mode generously
(every token it generated, padding and overrun included), and the ratio between them. Never runs a model.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from llmos.bench.systems import SERVING_SYSTEMS

WEIGHT_CONVENTION = ("every parameter read once per token, a tied embedding once (as the LM head); embedding "
                     "tables that are only gathered (an untied input embedding, position tables) left out")


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize_serving(raw: dict, lengths: list[int]) -> dict:
    """Throughput and latency of one serving run. `useful_tokens` counts, per request, at most the tokens it
    asked for; `generated_tokens` is what the system computed (a static batch's padding rows, an overrun past
    the requested length). Times in seconds; ITL pooled over every request's consecutive useful tokens."""
    if "error" in raw:
        return {"error": raw["error"]}
    rows = raw["requests"]
    outs = [r["output_ids"] for r in rows]
    useful = sum(min(len(o), n) for o, n in zip(outs, lengths))
    itl = [b - a for r, n in zip(rows, lengths) for a, b in zip(r["token_times"][:n - 1], r["token_times"][1:n])]
    ttft = [r["ttft_s"] for r in rows if r.get("ttft_s") is not None]
    wall = raw["wall_s"]
    return {"wall_s": wall, "useful_tokens": useful, "generated_tokens": raw["generated_tokens"],
            "useful_tok_s": useful / wall, "generated_tok_s": raw["generated_tokens"] / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95), "itl_p50_s": percentile(itl, 50),
            "peak_rss_mib": raw["peak_rss_bytes"] / 2**20, "setup_s": raw.get("setup_s"),
            "exact_lengths": [len(o) for o in outs] == lengths,
            "short_requests": sum(len(o) < n for o, n in zip(outs, lengths)), "notes": raw.get("notes", "")}


def agreement(a: list[list[int]], b: list[list[int]], lengths: list[int]) -> dict:
    """How many requests produced the same first `length` tokens in both runs, and where the others diverge."""
    diverged = {}
    for i, (x, y, n) in enumerate(zip(a, b, lengths)):
        x, y = x[:n], y[:n]
        if x != y:
            diverged[i] = next((j for j, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
    return {"identical": len(lengths) - len(diverged), "requests": len(lengths), "first_difference": diverged}


def compare(systems: dict) -> dict:
    """llmos's useful tokens/s over the best transformers mode's generated tokens/s (the generous count)."""
    peers = {s: v for s, v in systems.items() if s.startswith("hf-") and "error" not in v}
    if not peers:
        return {}
    best = max(peers, key=lambda s: peers[s]["generated_tok_s"])
    best_rate = peers[best]["generated_tok_s"]
    for v in systems.values():
        if "error" not in v:
            v["vs_best_peer"] = v["useful_tok_s"] / best_rate
    out = {"best_peer": best, "best_peer_generated_tok_s": best_rate}
    if "llmos" in systems and "error" not in systems["llmos"]:
        out["llmos_vs_best_peer"] = systems["llmos"]["useful_tok_s"] / best_rate
        out["llmos_vs_each_peer"] = {s: systems["llmos"]["useful_tok_s"] / v["generated_tok_s"] for s, v in peers.items()}
    return out


def summarize_decode(raw: dict) -> dict:
    """Batch-1 decode tokens/s, copy bandwidth and the roofline `bandwidth / weight bytes per token`."""
    d = {}
    ours, theirs, bw = raw.get("llmos-decode", {}), raw.get("hf-decode", {}), raw.get("bandwidth", {})
    for key, job in (("llmos", ours), ("hf", theirs), ("bandwidth", bw)):
        if "error" in job:
            d[f"{key}_error"] = job["error"]
    if "tokens_per_s" in ours:
        d.update(llmos_tok_s=ours["tokens_per_s"], weight_bytes=ours["weight_bytes"],
                 num_parameters=ours["num_parameters"], weight_convention=WEIGHT_CONVENTION)
    if "tokens_per_s" in theirs:
        d["hf_tok_s"] = theirs["tokens_per_s"]
    if "tokens_per_s" in ours and "tokens_per_s" in theirs:
        d["llmos_vs_hf"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        d["outputs_identical"] = ours["output_ids"] == theirs["output_ids"]
    if "bytes_per_s" in bw:
        d["bandwidth_bytes_per_s"] = bw["bytes_per_s"]
        if "weight_bytes" in d:
            d["roofline_tok_s"] = bw["bytes_per_s"] / d["weight_bytes"]
            d["llmos_fraction_of_roofline"] = d["llmos_tok_s"] / d["roofline_tok_s"]
            if "hf_tok_s" in d:
                d["hf_fraction_of_roofline"] = d["hf_tok_s"] / d["roofline_tok_s"]
            if "read_bytes_per_s" in bw:
                d["read_bandwidth_bytes_per_s"] = bw["read_bytes_per_s"]
                d["read_roofline_tok_s"] = bw["read_bytes_per_s"] / d["weight_bytes"]
                d["llmos_fraction_of_read_roofline"] = d["llmos_tok_s"] / d["read_roofline_tok_s"]
    return d


def summarize_model(name: str, model_dir: Path, mc, workload, requests: list, raw: dict) -> dict:
    lengths = [n for _, n in requests]
    systems = {s: summarize_serving(raw[s], lengths) for s in SERVING_SYSTEMS if s in raw}
    agree = {}
    if "llmos" in raw and "error" not in raw["llmos"]:
        ours = [r["output_ids"] for r in raw["llmos"]["requests"]]
        agree = {s: agreement(ours, [r["output_ids"] for r in raw[s]["requests"]], lengths)
                 for s in systems if s.startswith("hf-") and "error" not in raw[s]}
    return {"name": name, "model_dir": str(model_dir),
            "shape": {"model_type": mc.model_type, "hidden_size": mc.hidden_size, "num_layers": mc.num_layers,
                      "num_heads": mc.num_heads, "num_kv_heads": mc.num_kv_heads,
                      "intermediate_size": mc.intermediate_size, "vocab_size": mc.vocab_size,
                      "tie_word_embeddings": mc.tie_word_embeddings, "context_length": mc.context_length},
            "workload": asdict(workload), "requested_output_tokens": sum(lengths),
            "prompt_tokens": sum(len(ids) for ids, _ in requests), "systems": systems, "ratios": compare(systems),
            "greedy_agreement_with_llmos": agree, "decode": summarize_decode(raw), "raw": raw}


# ---- rendering --------------------------------------------------------------------------------------------

COLUMNS = ("system", "useful tok/s", "generated tok/s", "TTFT p50 s", "TTFT p95 s", "ITL p50 ms", "peak RSS MiB",
           "vs best peer")


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def table_rows(model: dict) -> list[list[str]]:
    rows = []
    for system, s in model["systems"].items():
        if "error" in s:
            rows.append([system, "failed"] + [""] * (len(COLUMNS) - 2))
            continue
        useful = _fmt(s["useful_tok_s"], ".1f") + (f" ({s['short_requests']} short!)" if s["short_requests"] else "")
        rows.append([system, useful, _fmt(s["generated_tok_s"], ".1f"), _fmt(s["ttft_p50_s"], ".2f"),
                     _fmt(s["ttft_p95_s"], ".2f"), _fmt(s["itl_p50_s"], ".1f", 1000), _fmt(s["peak_rss_mib"], ".0f"),
                     _fmt(s.get("vs_best_peer"), ".2f") + "x" if s.get("vs_best_peer") is not None else "n/a"])
    return rows


def headline(model: dict) -> str:
    r = model["ratios"]
    if "llmos_vs_best_peer" not in r:
        return "no llmos-to-transformers ratio (llmos or every transformers mode missing or failed)"
    return (f"llmos / best transformers mode = {r['llmos_vs_best_peer']:.2f}x: llmos "
            f"{model['systems']['llmos']['useful_tok_s']:.1f} useful output tokens/s against {r['best_peer']} at "
            f"{r['best_peer_generated_tok_s']:.1f} generated tokens/s (padding and overrun counted)")


def decode_line(model: dict, convention: bool = True) -> str:
    d, w = model["decode"], model["workload"]
    if not d:
        return ""
    parts = [f"Batch-1 decode ({w['decode_context']}-token prompt, {w['decode_steps']} decode steps, best of 3):"]
    rates = [f"{who} {d[key]:.1f} tokens/s" for who, key in (("llmos", "llmos_tok_s"), ("transformers", "hf_tok_s"))
             if key in d]
    ratio = f" (llmos/transformers {d['llmos_vs_hf']:.2f}x)" if "llmos_vs_hf" in d else ""
    if rates:
        parts.append(", ".join(rates) + ratio + ".")
    if "roofline_tok_s" in d:
        how = f" ({d['weight_convention']})" if convention else ""
        parts.append(f"Copy bandwidth {d['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (bytes read + written); "
                     f"{d['weight_bytes'] / 1e6:.1f} MB "
                     f"of weights read per token{how} -> roofline {d['roofline_tok_s']:.1f} "
                     f"tokens/s; llmos at {d['llmos_fraction_of_roofline']:.0%} of it"
                     + (f", transformers at {d['hf_fraction_of_roofline']:.0%}." if "hf_tok_s" in d else "."))
        if "read_roofline_tok_s" in d:
            parts.append(f"Against read bandwidth alone ({d['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, a sum over "
                         f"the tensor), the stricter roofline is {d['read_roofline_tok_s']:.1f} tokens/s and llmos is at "
                         f"{d['llmos_fraction_of_read_roofline']:.0%} of it.")
    parts += [f"{k.replace('_error', '')} failed: {v}" for k, v in d.items() if k.endswith("_error")]
    return " ".join(parts)


def workload_line(model: dict) -> str:
    w = model["workload"]
    line = (f"{w['num_requests']} requests at t=0, prompts {w['prompt_lens'][0]}-{w['prompt_lens'][1]} tokens "
            f"({model['prompt_tokens']} in all), outputs {w['output_lens'][0]}-{w['output_lens'][1]} tokens "
            f"({model['requested_output_tokens']} requested), seed {w['seed']}, greedy, EOS ignored")
    if w.get("scaled_from"):
        line += (f"; lengths scaled down to fit the {model['shape']['context_length']}-token context "
                 f"(from prompts up to {w['scaled_from'][0]}, outputs up to {w['scaled_from'][1]})")
    return line


def model_title(model: dict) -> str:
    s = model["shape"]
    params = model["decode"].get("num_parameters")
    size = f"{params / 1e6:.3g}M parameters, " if params else ""
    return (f"{model['name']} ({size}{s['model_type']}, hidden {s['hidden_size']}, {s['num_layers']} layers, "
            f"{s['num_heads']} heads, vocabulary {s['vocab_size']}, fp32)")


def agreement_line(model: dict) -> str:
    a = model["greedy_agreement_with_llmos"]
    return "; ".join(f"{s}: {v['identical']}/{v['requests']}" for s, v in a.items())


def print_tables(results: dict, console: Console) -> None:
    for model in results["models"]:
        table = Table(title=model_title(model), caption=workload_line(model))
        for i, col in enumerate(COLUMNS):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in table_rows(model):
            table.add_row(*row)
        console.print(table)
        console.print(f"[bold]{headline(model)}[/bold]")
        if model["greedy_agreement_with_llmos"]:
            console.print(f"greedy outputs identical to llmos's (requests): {agreement_line(model)}")
        if model["decode"]:
            console.print(decode_line(model, convention=False))
        for system, s in model["systems"].items():
            console.print(f"  {system}: {s.get('error') or s['notes']}", style="dim")


def render_markdown(results: dict) -> str:
    """The `docs/benchmarks.md` section for these results: machine, date, the exact command, tables, ratios."""
    m = results["machine"]
    lines = ["## Serving benchmark", "",
             f"Machine: {m['platform']}, {m['cpu_count']} CPUs ({m['processor']}), Python {m['python']}, "
             f"torch {m['torch']}, transformers {m['transformers']}, {m['threads']} threads per system. "
             f"Date: {results['date']}.", "", "```", results["command"], "```", ""]
    lines += [f"- {note}" for note in results["notes"]] + ([""] if results["notes"] else [])
    for model in results["models"]:
        lines += [f"### {model_title(model)}", "", f"Workload: {workload_line(model)}.", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(model)]
        lines += ["", f"**{headline(model)}.**", ""]
        if model["greedy_agreement_with_llmos"]:
            lines += [f"Greedy outputs identical to llmos's, requests: {agreement_line(model)}.", ""]
        if model["decode"]:
            lines += [decode_line(model), ""]
        lines += [f"- {system}: {s.get('error') or s['notes']}" for system, s in model["systems"].items()] + [""]
    lines += ["Useful tokens/s: the output tokens the requests asked for, over the wall time from the first "
              "arrival to the last token. Generated tokens/s: every token the system generated (a static batch "
              "runs every row to the longest output; `generate_batch` runs every request to the longest output). "
              "The ratio divides llmos's useful tokens/s by the best transformers mode's generated tokens/s. "
              "Each system runs alone in its own process on the same checkpoint, fp32, same thread count; model "
              "loading and transformers' continuous-batching setup are outside the timed window.", ""]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> list[Path] | str:
    """One PNG per model: serving tokens/s per system (useful and generated), and batch-1 decode against the
    roofline. Returns the files, or a note when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart"
    files = []
    for model in results["models"]:
        ok = {s: v for s, v in model["systems"].items() if "error" not in v}
        d = model["decode"]
        decode = {k: d[key] for k, key in (("llmos", "llmos_tok_s"), ("transformers", "hf_tok_s"),
                                           ("roofline", "roofline_tok_s")) if key in d}
        fig, axes = plt.subplots(1, 2 if decode else 1, figsize=(12 if decode else 7, 4), squeeze=False)
        ax = axes[0][0]
        names = list(ok)
        y = np.arange(len(names))
        ax.barh(y - 0.2, [ok[s]["useful_tok_s"] for s in names], 0.4, label="useful")
        ax.barh(y + 0.2, [ok[s]["generated_tok_s"] for s in names], 0.4, label="generated")
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel("output tokens/s")
        ax.set_title(f"{model['name']}: {model['workload']['num_requests']} concurrent requests")
        ax.legend()
        if decode:
            ax = axes[0][1]
            ax.bar(list(decode), list(decode.values()), color=["C0", "C1", "0.6"][:len(decode)])
            ax.set_ylabel("tokens/s")
            ax.set_title("batch-1 decode")
        fig.tight_layout()
        path = out / f"serving-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(model['name']).name)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    return files


def write_results(results: dict, out: Path, console: Console) -> None:
    """Print the tables; write results.json, benchmarks-section.md and the charts into `out`."""
    print_tables(results, console)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "benchmarks-section.md").write_text(render_markdown(results))
    charts = plot(results, out)
    console.print(f"wrote {out / 'results.json'}, {out / 'benchmarks-section.md'}"
                  + (f", {', '.join(str(p) for p in charts)}" if isinstance(charts, list) else f" ({charts})"))
