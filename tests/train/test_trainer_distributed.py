"""Two CPU processes (torchrun, gloo) train the same loss curve as one process with the same global batch.

Tolerance: 1e-4 relative on every logged loss of a short run (5 steps). The ranks sum their halves of the
batch and DDP/FSDP average the gradients, so only the order of floating-point additions differs from one
process: measured differences are about 1e-7 relative. Over hundreds of steps at lr 1e-2 those roundings
compound (measured: up to 1.5e-4 relative at step 300), so the long suspend/resume runs check their first
20 steps at 1e-4 and the whole curve at 1e-3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import llmos
from llmos.train.trainer import TrainConfig, train

TEXT = "".join(f"Line {i}: in the beginning was the word, and the word was with light.\n" for i in range(200))
SRC = str(Path(llmos.__file__).resolve().parents[1])
RTOL = 1e-4
LONG_RTOL = 1e-3


def settings(tmp_path: Path, out: str, **overrides) -> dict:
    d = dict(data=[str(tmp_path / "t.txt")], out_dir=str(tmp_path / out), vocab_size=300, hidden_size=16,
             num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32, seq_len=16, batch_size=4, grad_accum=2,
             max_steps=5, warmup_steps=1, lr=1e-2, min_lr=1e-3, eval_interval=5, eval_steps=2, log_interval=1,
             num_threads=1, progress=False, seed=11, device="cpu")
    d.update(overrides)
    return d


def torchrun(tmp_path: Path, d: dict) -> subprocess.Popen:
    """`llmos train --config FILE --nproc 2`: the CLI relaunches itself under torchrun."""
    f = tmp_path / f"{Path(d['out_dir']).name}.yaml"
    f.write_text(yaml.safe_dump(d))
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmos.cli.train_cmd", "--config", str(f), "--nproc", "2",
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def rows(out: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def assert_same_curve(a: list[tuple[int, float]], b: list[tuple[int, float]], rtol: float = RTOL) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) <= rtol * abs(y), f"step {step}: {x} vs {y}"


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, kind):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    train(TrainConfig(**settings(tmp_path, "single")))
    proc = torchrun(tmp_path, settings(tmp_path, "double", dist=kind))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert_same_curve(rows(tmp_path / "double", "train_loss"), rows(tmp_path / "single", "train_loss"))
    assert_same_curve(rows(tmp_path / "double", "val_loss"), rows(tmp_path / "single", "val_loss"))
    assert len(rows(tmp_path / "double", "train_loss")) == 5  # rank 0 alone logs
    assert json.loads((tmp_path / "double" / "progress.json").read_text())["state"] == "finished"
    from llmos.model.loader import load_model

    load_model(tmp_path / "double")  # a full (unsharded) Hugging Face checkpoint


def test_a_two_rank_fsdp_checkpoint_resumes_on_one_process(tmp_path):
    """Killed (SIGKILL to torchrun and both ranks) after a checkpoint, resumed by one process: the curve
    continues as the single-process run's."""
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    long = dict(max_steps=300, save_interval=3, eval_interval=150)
    proc = torchrun(tmp_path, settings(tmp_path, "run", dist="fsdp", **long))
    state = tmp_path / "run" / "checkpoints" / "last" / "trainer_state.json"
    deadline = time.monotonic() + 300
    step = -1
    while step < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            step = json.loads(state.read_text())["step"]
        except (OSError, ValueError):
            time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = json.loads(state.read_text())
    assert 3 <= saved["step"] < 300 and saved["world_size"] == 2, "finished before the kill: proves nothing"

    summary = train(TrainConfig(**settings(tmp_path, "run", resume=True, dist="fsdp", **long)))
    assert summary["state"] == "finished"
    train(TrainConfig(**settings(tmp_path, "single", **long)))
    ours, theirs = rows(tmp_path / "run", "train_loss"), rows(tmp_path / "single", "train_loss")
    assert [s for s, _ in ours] == list(range(1, 301))
    assert_same_curve(ours[:20], theirs[:20])
    assert_same_curve(ours, theirs, LONG_RTOL)


def test_sigusr1_to_the_launchers_group_suspends_two_ranks_and_resume_finishes(tmp_path):
    """What the daemon's suspend does: SIGUSR1 to the process group of `llmos train --nproc 2`. The launcher
    passes it to torchrun as SIGTERM, the ranks agree on a step, checkpoint and exit; the launcher exits 0.
    `llmos train --out RUN --resume` (the run's own config, 2 ranks again) then finishes the curve."""
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    long = dict(max_steps=300, save_interval=3, eval_interval=150)
    proc = torchrun(tmp_path, settings(tmp_path, "run", **long))
    state = tmp_path / "run" / "checkpoints" / "last" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not state.is_file() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["state"] == "suspended" and 3 <= progress["step"] < 300, progress
    assert json.loads(state.read_text())["step"] == progress["step"]

    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "llmos.cli.train_cmd", "--out", str(tmp_path / "run"), "--resume",
                           "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "run" / "progress.json").read_text())["state"] == "finished"
    train(TrainConfig(**settings(tmp_path, "single", **long)))
    ours = rows(tmp_path / "run", "train_loss")
    assert [s for s, _ in ours] == list(range(1, 301))
    theirs = rows(tmp_path / "single", "train_loss")
    assert_same_curve(ours[:20], theirs[:20])
    assert_same_curve(ours, theirs, LONG_RTOL)


def test_the_launcher_finds_a_new_runs_progress_in_its_work_folder(tmp_path, monkeypatch):
    """A new run into a finished --out writes progress.json into `.<name>.run-<pid of rank 0>`: a stop signal
    that suspended it exits the launcher 0 (not torchrun's 143), like a run into --out itself."""
    from llmos.train import distributed

    out = tmp_path / "run"
    out.mkdir()
    (out / "progress.json").write_text(json.dumps({"state": "finished"}))  # the finished run's
    old = time.time() - 3600
    os.utime(out / "progress.json", (old, old))
    stale = tmp_path / ".run.run-1"  # an older suspended run's, before this launch
    stale.mkdir()
    (stale / "progress.json").write_text(json.dumps({"state": "suspended"}))
    os.utime(stale / "progress.json", (old, old))

    class Ranks:
        def __init__(self, *args, **kwargs):
            self.signals = []

        def send_signal(self, signum):
            self.signals.append(signum)
            work = tmp_path / ".run.run-4242"
            work.mkdir()
            (work / "progress.json").write_text(json.dumps({"state": "suspended", "step": 3}))

        def wait(self):
            os.kill(os.getpid(), signal.SIGTERM)  # Ctrl-C / the daemon's suspend reaching the launcher
            return 143

    monkeypatch.setattr(distributed.subprocess, "Popen", Ranks)
    assert distributed.launch(2, ["--config", "x.yaml"], progress_file=out / "progress.json") == 0
    assert distributed.run_progress(out / "progress.json")["step"] == 3


def test_the_launcher_keeps_the_status_of_a_stop_that_did_not_suspend(tmp_path, monkeypatch):
    from llmos.train import distributed

    out = tmp_path / "run"
    stale = tmp_path / ".run.run-1"
    stale.mkdir(parents=True)
    (stale / "progress.json").write_text(json.dumps({"state": "suspended"}))
    old = time.time() - 3600
    os.utime(stale / "progress.json", (old, old))

    class Ranks:
        def __init__(self, *args, **kwargs):
            pass

        def send_signal(self, signum):
            pass

        def wait(self):
            os.kill(os.getpid(), signal.SIGTERM)
            return 143

    monkeypatch.setattr(distributed.subprocess, "Popen", Ranks)
    assert distributed.launch(2, ["--config", "x.yaml"], progress_file=out / "progress.json") == 143
