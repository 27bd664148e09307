"""`llmos train`'s command line: every flag the docs and the error messages name exists, and user errors end
in one `error:` line with exit status 2 (through `python -m llmos.cli.train_cmd`, as a user runs it)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

import llmos
from llmos.cli.train_cmd import train_command

ROOT = Path(llmos.__file__).resolve().parents[2]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
NOT_TRAIN_FLAGS = {"--standalone", "--nproc-per-node", "--set"}  # torchrun's own flags; --set is checked apart


def train_flags() -> set[str]:
    """Every option `llmos train --help` lists (both names of a --x/--no-x pair)."""
    app = typer.Typer()
    app.command()(train_command)
    command = typer.main.get_command(app)
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def documented_train_commands() -> list[tuple[str, str]]:
    """(file, command) for every `llmos train ...` in README.md and docs/: code lines (joined over trailing
    backslashes, comments dropped) and inline `llmos train ...` code spans."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            for m in re.finditer(r"`(llmos train[^`]*)`", line):
                found.append((path.name, m.group(1)))
            if re.match(r"^\s*(\$ )?llmos train\b", line):
                text = line
                while text.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text.rstrip()[:-1] + " " + lines[i]
                found.append((path.name, text.split(" #")[0]))
            i += 1
    return found


def test_the_docs_show_train_commands():
    assert len(documented_train_commands()) > 10


def test_every_documented_train_flag_exists():
    flags = train_flags() | {"--help", "--set"}
    missing = sorted({(f, name) for name, cmd in documented_train_commands() for f in FLAG.findall(cmd)
                      if f not in flags})
    assert not missing, f"documented `llmos train` flags that do not exist: {missing}"


def test_every_flag_an_error_message_names_exists():
    flags = train_flags()
    missing = set()
    for path in sorted((ROOT / "src" / "llmos" / "train").glob("*.py")):
        for f in FLAG.findall(path.read_text(encoding="utf-8")):
            if f not in flags and f not in NOT_TRAIN_FLAGS:
                missing.add((path.name, f))
    assert not missing, f"flags named in llmos.train that `llmos train` lacks: {sorted(missing)}"


def test_data_flags_reach_the_config(tmp_path, monkeypatch):
    """The data flags land in the resolved TrainConfig (stopped just before training)."""
    import llmos.train.trainer as trainer

    seen = {}

    def fake_train(config):
        seen["config"] = config
        return {"state": "done"}

    monkeypatch.setattr(trainer, "train", fake_train)
    data = tmp_path / "r.csv"
    data.write_text("review,stars\ngood,5\n")
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(train_command)
    result = CliRunner().invoke(app, [
        "--data", str(data), "--out", str(tmp_path / "run"), "--text-column", "review", "--label-column", "stars",
        "--text-field", "body", "--messages-field", "conv", "--normalize", "nfkc", "--clean", "--no-dedup",
        "--chat-tokens", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj", "--beta2", "0.99", "--quiet"])
    assert result.exit_code == 0, result.output
    c = seen["config"]
    assert (c.text_column, c.label_column, c.text_field, c.messages_field) == ("review", "stars", "body", "conv")
    assert (c.normalize, c.clean, c.dedup, c.chat_tokens) == ("nfkc", True, False, True)
    assert (c.lora_alpha, c.lora_targets, c.beta2) == (8.0, ["q_proj", "v_proj"], 0.99)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m llmos.cli.train_cmd ARGS` as a user runs it (one thread per process)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "llmos.cli.train_cmd", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def tiny_csv(path: Path) -> Path:
    rows = [("heaven earth light", "earth"), ("quick brown fox", "animals"), ("def main return", "code")] * 6
    path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    return path


@pytest.mark.parametrize("mode", ["trained", "zero-shot"])
def test_classify_runs_end_with_an_accuracy_line(tmp_path, model_factory, mode):
    base = model_factory(tmp_path / "base", max_positions=64)
    out = tmp_path / "clf"
    extra = ["--zero-shot"] if mode == "zero-shot" else ["--max-steps", "4", "--batch-size", "4", "--log-interval", "2",
                                                          "--eval-interval", "4", "--warmup-steps", "1"]
    done = run_cli("--task", "classify", "--data", str(tiny_csv(tmp_path / "t.csv")), "--init-from", str(base),
                   "--out", str(out), "--val-fraction", "0.34", "--seq-len", "16", "--threads", "1", *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert (out / "metrics.json").is_file()
    report = json.loads((out / "metrics.json").read_text())
    assert re.search(rf"wrote {re.escape(str(out))}: accuracy {report['accuracy']:.3f} on "
                     rf"{report['val_examples']} held-out rows", done.stdout), done.stdout


def test_summary_lines_per_task():
    from llmos.cli.train_cmd import summary_line

    assert summary_line("o", {"parameters": 1234, "tokens": 5000, "train_seconds": 3.2, "val_perplexity": 9.5}) == \
        "wrote o: 1,234 parameters, 5,000 tokens, 3 s, validation perplexity 9.50"
    assert summary_line("o", {"task": "classify", "mode": "trained", "accuracy": 0.5, "val_examples": 6, "steps": 4,
                              "parameters": 10, "seconds": 1.0}) == \
        "wrote o: accuracy 0.500 on 6 held-out rows (4 steps, 1 s)"
    assert summary_line("o", {"state": "finished"}) is None


TINY = ["--vocab-size", "300", "--hidden-size", "16", "--layers", "2", "--heads", "2", "--kv-heads", "1",
        "--intermediate-size", "32", "--seq-len", "16", "--threads", "1", "--device", "cpu", "--eval-steps", "1"]
TEXT = "".join(f"Line {i}: in the beginning was the word, and the word was with light.\n" for i in range(200))


def one_error_line(done: subprocess.CompletedProcess, expected: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert [line for line in output.splitlines() if line.startswith("error:")] == [f"error: {expected}"], output
    for noise in ("Traceback", "ChildFailedError", "torch.distributed", "death signal"):
        assert noise not in output, output


def test_nproc_input_errors_are_one_line_before_torchrun(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "t.txt").write_text(TEXT)
    done = run_cli(*TINY, "--nproc", "2", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "a"),
                   "--batch-size", "4")
    one_error_line(done, f"{tmp_path / 'empty.txt'} is empty; remove it from --data or put text in it.")
    done = run_cli(*TINY, "--nproc", "2", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "b"),
                   "--set", "batch_size=3")
    one_error_line(done, "--batch-size 3 is the global batch; it must be a multiple of the 2 processes (--nproc).")
    done = run_cli(*TINY, "--nproc", "2", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "c"),
                   "--batch-size", "4", "--init-from", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and done.stderr.startswith("error: --init-from") and "Traceback" not in done.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing started


def test_an_error_inside_the_ranks_is_one_line(tmp_path):
    (tmp_path / "small.txt").write_text("hi there\n")
    done = run_cli(*TINY, "--nproc", "2", "--data", str(tmp_path / "small.txt"), "--out", str(tmp_path / "run"),
                   "--batch-size", "4", "--quiet")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "too short" in errors[0], output
    for noise in ("Traceback", "ChildFailedError", "death signal"):
        assert noise not in output, output


def test_ctrl_c_on_two_ranks_says_only_suspended(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmos.cli.train_cmd", *TINY, "--nproc", "2", "--data",
                             str(tmp_path / "t.txt"), "--out", str(out), "--batch-size", "4", "--max-steps", "100000",
                             "--eval-interval", "1000"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and '"step"' not in _read(out / "progress.json"):
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    assert f"continue with `llmos train --out {out} --resume`" in " ".join(output.split())  # rich wraps lines
    for noise in ("Traceback", "SignalException", "death signal", "ChildFailedError"):
        assert noise not in output, output


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_documented_run_commands_name_the_model_with_the_flag():
    """`llmos run PROMPT` takes the model as --model; a path as the first argument would be the prompt."""
    wrong = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for line in path.read_text(encoding="utf-8").splitlines():
            for m in re.finditer(r"llmos run +([^\s\"'`|-][^\s`]*)", line):
                if "/" in m.group(1):  # runs/tiny, ./my-model, /models/x
                    wrong.append((path.name, line.strip()))
    assert not wrong, wrong
