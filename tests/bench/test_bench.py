"""The serving benchmark's accounting and its correctness cross-check (not a timing): the --quick workload on a
tiny random model, llmos and transformers' sequential `generate`, each in its own subprocess."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from llmos.bench import checkpoints, report, systems
from llmos.bench.serving import QUICK, BenchConfig, Workload, run_benchmark
from llmos.errors import InvalidRequestError, ModelLoadError
from llmos.model.config import ModelConfig
from llmos.model.tokenizer import Tokenizer
from llmos.model.transformer import build_model


@pytest.fixture(scope="module")
def bench_model_dir(tmp_path_factory):
    return checkpoints.ensure_random_model("tiny", tmp_path_factory.mktemp("bench-cache"))


@pytest.fixture(scope="module")
def quick_run(bench_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    config = BenchConfig(models=[str(bench_model_dir)], systems=("llmos", "hf-sequential"), quick=True,
                         decode=False, threads=1, out=out)
    results = run_benchmark(config, Console(file=io.StringIO(), width=160))
    return results, out


def test_quick_run_results_structure(quick_run):
    results, out = quick_run
    assert set(results) >= {"command", "date", "machine", "models", "notes"}
    assert results["command"].startswith("llmos bench --quick --model ")
    (model,) = results["models"]
    assert set(model["systems"]) == {"llmos", "hf-sequential"}
    for name, s in model["systems"].items():
        assert "error" not in s, s
        for key in ("useful_tok_s", "generated_tok_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_s", "peak_rss_mib"):
            assert s[key] > 0, (name, key)
        assert s["ttft_p50_s"] <= s["ttft_p95_s"]
        assert 50 < s["peak_rss_mib"] < 8192  # per process: VmHWM, not the parent's inherited ru_maxrss
    assert model["ratios"]["best_peer"] == "hf-sequential"
    assert model["ratios"]["llmos_vs_best_peer"] == pytest.approx(
        model["systems"]["llmos"]["useful_tok_s"] / model["systems"]["hf-sequential"]["generated_tok_s"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"][0]["systems"]["llmos"]["useful_tokens"] == model["systems"]["llmos"]["useful_tokens"]
    markdown = (out / "benchmarks-section.md").read_text()
    assert results["command"] in markdown and "| llmos |" in markdown and "| hf-sequential |" in markdown


def test_every_request_gets_exactly_its_length_and_greedy_outputs_match(quick_run):
    results, _ = quick_run
    model = results["models"][0]
    w = model["workload"]
    assert w["num_requests"] == QUICK.num_requests
    lengths = [n for _, n in Workload(**{**w, "prompt_lens": tuple(w["prompt_lens"]),
                                         "output_lens": tuple(w["output_lens"])}).requests(512)]
    assert sum(lengths) == model["requested_output_tokens"]
    outputs = {}
    for name in ("llmos", "hf-sequential"):
        raw = model["raw"][name]
        outputs[name] = [r["output_ids"] for r in raw["requests"]]
        assert [len(o) for o in outputs[name]] == lengths, name
        assert raw["generated_tokens"] == sum(lengths)
        assert model["systems"][name]["useful_tokens"] == sum(lengths)
        assert model["systems"][name]["exact_lengths"]
        for r, n in zip(raw["requests"], lengths):
            assert len(r["token_times"]) == n and r["token_times"] == sorted(r["token_times"])
    assert outputs["llmos"] == outputs["hf-sequential"]  # token for token
    assert len({t for o in outputs["llmos"] for t in o}) > 4  # varied outputs, not one repeated token
    assert model["greedy_agreement_with_llmos"]["hf-sequential"]["identical"] == len(lengths)


def test_accounting_counts_peers_generously_and_llmos_strictly():
    lengths = [2, 4]
    padded = {"wall_s": 2.0, "generated_tokens": 8, "peak_rss_bytes": 2**20,
              "requests": [{"output_ids": [1, 2, 3, 4], "ttft_s": 0.5, "token_times": [0.5, 1.0, 1.5, 2.0]},
                           {"output_ids": [5, 6, 7, 8], "ttft_s": 0.5, "token_times": [0.5, 1.0, 1.5, 2.0]}]}
    short = {"wall_s": 1.0, "generated_tokens": 5, "peak_rss_bytes": 2**20,
             "requests": [{"output_ids": [1, 2], "ttft_s": 0.1, "token_times": [0.1, 0.2]},
                          {"output_ids": [5, 6, 9], "ttft_s": 0.1, "token_times": [0.1, 0.2, 0.3]}]}
    static = report.summarize_serving(padded, lengths)
    assert (static["useful_tokens"], static["useful_tok_s"], static["generated_tok_s"]) == (6, 3.0, 4.0)
    assert static["itl_p50_s"] == pytest.approx(0.5)
    ours = report.summarize_serving(short, lengths)
    assert ours["useful_tokens"] == 5 and not ours["exact_lengths"] and ours["short_requests"] == 1
    ratios = report.compare({"llmos": ours, "hf-static": static})
    assert ratios["llmos_vs_best_peer"] == pytest.approx(5.0 / 4.0)  # against generated, not useful, tokens/s
    agree = report.agreement([[1, 2], [5, 6, 7]], [[1, 2, 3], [5, 6, 8, 9]], [2, 3])
    assert agree["identical"] == 1 and agree["first_difference"] == {1: 2}


def test_workload_is_seeded_and_fits_the_context():
    w = Workload()
    a, b = w.requests(32000), Workload().requests(32000)
    assert a == b and len(a) == 32
    assert all(32 <= len(ids) <= 512 and 16 <= n <= 256 and min(ids) >= 100 for ids, n in a)
    assert Workload(seed=1).requests(32000) != a
    small = w.fit(256)
    assert small.prompt_lens[1] + small.output_lens[1] < 256 and small.scaled_from == (512, 256)
    assert w.fit(1024) is w


def test_weight_bytes_count_a_tied_table_once_and_skip_gathered_ones():
    base = dict(model_type="llama", vocab_size=100, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                intermediate_size=16, max_position_embeddings=32)
    tied = build_model(ModelConfig(**base, tie_word_embeddings=True))
    untied = build_model(ModelConfig(**base, tie_word_embeddings=False))
    table = 100 * 8 * 4
    assert systems.weight_bytes_per_token(tied) == systems.num_parameters(tied) * 4
    assert systems.weight_bytes_per_token(untied) == systems.num_parameters(untied) * 4 - table
    assert systems.num_parameters(untied) == systems.num_parameters(tied) + 100 * 8


def test_bench_tokenizer_decodes_every_id(tmp_path):
    checkpoints.write_tokenizer(tmp_path, 600)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 600 and tok.eos_token_ids == [0]
    assert tok.decode(tok.encode("héllo, wörld 🤖")) == "héllo, wörld 🤖"
    assert all(isinstance(tok.decode([i]), str) for i in range(2, 600))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(systems=("llmos", "vllm")), InvalidRequestError, "unknown system"),
    (dict(systems=()), InvalidRequestError, "unknown system"),
    (dict(requests=0), InvalidRequestError, "at least 1"),
    (dict(threads=-1), InvalidRequestError, "threads"),
    (dict(kv_memory="lots"), InvalidRequestError, "memory budget"),
    (dict(models=["/no/such/model"]), ModelLoadError, "neither a directory"),
])
def test_bad_options(kwargs, error, match, tmp_path):
    with pytest.raises(error, match=match):
        run_benchmark(BenchConfig(out=tmp_path / "out", **kwargs), Console(file=io.StringIO()))
    assert not (tmp_path / "out").exists()


def test_missing_default_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoints, "default_model_dir", lambda: tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="make_default_model.sh"):
        checkpoints.resolve_model("default")



def test_a_model_given_by_relative_path_logs_into_out(bench_model_dir, tmp_path, monkeypatch):
    """`--model sub/dir`: the job logs go to OUT/logs/<dir name>-<system>.log, never beside the model."""
    import shutil

    shutil.copytree(bench_model_dir, tmp_path / "models" / "tiny model")
    monkeypatch.chdir(tmp_path)
    config = BenchConfig(models=["models/tiny model"], systems=("llmos",), quick=True, decode=False, threads=1,
                         out=tmp_path / "out")
    results = run_benchmark(config, Console(file=io.StringIO(), width=160))
    assert not results["models"][0]["failed"]
    assert sorted(p.name for p in (tmp_path / "out" / "logs").iterdir()) == ["tiny_model-llmos.log"]
    assert not list((tmp_path / "models").glob("*.log"))


def test_bad_input_found_by_a_job_is_a_clear_error(bench_model_dir, tmp_path):
    """A truncated checkpoint (or a kernel setting the job refuses) stops the run with the job's own message."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bench_model_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = BenchConfig(models=[str(bad)], systems=("llmos",), quick=True, decode=False, threads=1,
                         out=tmp_path / "out")
    with pytest.raises(InvalidRequestError, match=r"llmos on .*bad.*safetensors"):
        run_benchmark(config, Console(file=io.StringIO(), width=160))


def test_cli_exit_codes_for_failed_runs_and_empty_systems(bench_model_dir, tmp_path, monkeypatch):
    """A run that crashes: results are written and the command exits 1 naming it; `--systems ""` is refused
    (exit 2) instead of meaning the default systems."""
    import typer
    from typer.testing import CliRunner

    from llmos.bench import serving
    from llmos.cli import bench_cmd

    app = typer.Typer()
    app.command()(bench_cmd.bench_command)
    monkeypatch.setattr(serving, "run_job", lambda spec, log, bar, task: {"error": "exit code 1: boom"})
    result = CliRunner().invoke(app, ["--model", str(bench_model_dir), "--systems", "llmos", "--quick",
                                      "--no-decode", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "1 run(s) failed" in result.output and "boom" in result.output
    assert (tmp_path / "out" / "results.json").is_file()
    result = CliRunner().invoke(app, ["--systems", "", "--out", str(tmp_path / "out2")])
    assert isinstance(result.exception, InvalidRequestError) and "unknown system" in str(result.exception)
