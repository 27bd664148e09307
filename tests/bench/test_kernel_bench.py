"""The kernel benchmarks' measurements on a tiny random model (correctness of what they count, not timings)."""

from __future__ import annotations

import pytest

from llmos.bench import checkpoints, kernel_bench


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return checkpoints.ensure_random_model("tiny", tmp_path_factory.mktemp("bench-cache"))


def test_prefix_cache_benchmark_counts_hits_and_compares_outputs(model_dir):
    r = kernel_bench.prefix_cache_benchmark(model_dir, requests=3, system_tokens=64, question_tokens=5, max_tokens=3)
    assert r["same_outputs"]
    assert r["off"]["prefix_cache"]["prefix_hits"] == 0
    assert r["on"]["prefix_cache"]["prefix_hits"] == 2 * 64  # requests 2 and 3 reuse the 4 full system blocks
    assert len(r["on"]["ttft_s"]) == 3 and r["speedup"] > 0


def test_fork_benchmark_shares_the_prompt_blocks(model_dir):
    r = kernel_bench.fork_benchmark(model_dir, n=4, prompt_tokens=64, max_tokens=4)
    assert r["fork"]["processes"] == r["independent"]["processes"] == 4
    assert r["independent"]["peak_blocks"] == 4 * 5  # 68 tokens = 5 blocks each, nothing shared
    assert r["fork"]["peak_blocks"] == 4 + 4  # the 4 full prompt blocks once, one tail block per continuation
    assert r["ratio"] == pytest.approx(8 / 20)


def test_scheduling_real_runs_and_section(model_dir, tmp_path):
    fair = {p: kernel_bench.fairness_real_run(model_dir, p, heavy=10, light=1, prompt_tokens=8, max_tokens=8)
            for p in ("fcfs", "fair")}
    assert fair["fair"]["max_abs_diff"] < fair["fcfs"]["max_abs_diff"]
    prio = {p: kernel_bench.priority_real_run(model_dir, p, batch=8, batch_tokens=16, interactive_after_steps=3)
            for p in ("fcfs", "priority")}
    assert prio["priority"]["ttft_s"] < prio["fcfs"]["ttft_s"]
    section = kernel_bench.kernel_section({
        "model": "tiny", "sched_model": "tiny", "fairness": fair, "priority": prio,
        "prefix_cache": kernel_bench.prefix_cache_benchmark(model_dir, requests=2, system_tokens=32,
                                                            question_tokens=2, max_tokens=2),
        "fork": kernel_bench.fork_benchmark(model_dir, n=2, prompt_tokens=32, max_tokens=2)})
    assert section.count("\n") == 6 and "| prefix cache (tiny)" in section
