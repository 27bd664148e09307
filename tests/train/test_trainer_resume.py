"""Exact resume: a run stopped by SIGUSR1, then SIGKILLed, then resumed, logs the same losses as one uninterrupted run."""

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

TEXT = "".join(f"Verse {i}: and the light was divided from the darkness, and it was good.\n" for i in range(300))
SRC = str(Path(llmos.__file__).resolve().parents[1])


def settings(tmp_path: Path, out: str, **overrides) -> dict:
    d = dict(data=[str(tmp_path / "t.txt")], out_dir=str(tmp_path / out), vocab_size=300, hidden_size=16,
             num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, seq_len=16, batch_size=2,
             max_steps=160, warmup_steps=5, lr=3e-3, min_lr=3e-4, eval_interval=40, eval_steps=2, log_interval=1,
             save_interval=4, num_threads=1, progress=False, seed=5, dtype="float32", device="cpu")
    d.update(overrides)
    return d


def start(config_file: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmos.cli.train_cmd", "--config", str(config_file), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, at_least: int) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        step = checkpoint_step(out)
        if step >= at_least:
            return step
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its checkpoint at step {at_least}: {proc.stdout.read()}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("no checkpoint within 120 s")


def rows(out: Path, key: str) -> list[tuple]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["tokens"], r.get("lr"), r[key]) for r in map(json.loads, lines) if key in r]


def test_sigusr1_then_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    reference = train(TrainConfig(**settings(tmp_path, "reference")))
    assert reference["state"] == "finished"

    out = tmp_path / "run"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(settings(tmp_path, "run")))

    # 1. SIGUSR1: finish the step, checkpoint, progress "suspended", exit 0
    proc = start(config_file)
    wait_for_checkpoint(proc, out, 8)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    suspended = json.loads((out / "progress.json").read_text())
    assert suspended["state"] == "suspended" and 8 <= suspended["step"] < 160, suspended
    assert checkpoint_step(out) == suspended["step"]
    assert "suspended" in output and "--resume" in output
    assert not (out / "config.json").exists()  # no final weights before the end

    # 2. --resume, then SIGKILL somewhere after a later checkpoint: rows past that checkpoint are orphans
    proc = start(config_file, "--resume")
    killed_after = wait_for_checkpoint(proc, out, suspended["step"] + 12)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert killed_after < 160, "the run finished before it could be killed; the test proves nothing"

    # 3. resume to the end, in this process
    summary = train(TrainConfig(**settings(tmp_path, "run", resume=True)))
    assert summary["state"] == "finished"
    assert json.loads((out / "progress.json").read_text())["state"] == "finished"

    ours, theirs = rows(out, "train_loss"), rows(tmp_path / "reference", "train_loss")
    assert [r[0] for r in ours] == list(range(1, 161))
    assert ours == theirs  # exact: same step, tokens, learning rate and loss bits
    assert rows(out, "val_loss") == rows(tmp_path / "reference", "val_loss")
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_resume_refuses_changed_settings_and_missing_state(tmp_path):
    from llmos.errors import InvalidRequestError

    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    with pytest.raises(InvalidRequestError, match="nothing to resume"):
        train(TrainConfig(**settings(tmp_path, "run", resume=True)))
    train(TrainConfig(**settings(tmp_path, "run", max_steps=4)))
    with pytest.raises(InvalidRequestError, match=r"lr: 0.003 -> 0.01"):
        train(TrainConfig(**settings(tmp_path, "run", max_steps=4, lr=1e-2, resume=True)))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_unfinished_run_is_never_overwritten_by_a_new_one(tmp_path, signum):
    """SIGTERM and Ctrl-C (SIGINT) also checkpoint and stop with exit 0; a new run then refuses the directory."""
    from llmos.errors import InvalidRequestError

    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    proc = start(_write(tmp_path, settings(tmp_path, "run", save_interval=2)))
    wait_for_checkpoint(proc, out, 2)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 0
    assert json.loads((out / "progress.json").read_text())["state"] == "suspended"
    assert yaml.safe_load((out / "config.yaml").read_text())["resume"] is False
    before = (out / "checkpoints" / "last" / "trainer_state.safetensors").read_bytes()
    with pytest.raises(InvalidRequestError, match="unfinished run.*--resume"):
        train(TrainConfig(**settings(tmp_path, "run")))
    assert (out / "checkpoints" / "last" / "trainer_state.safetensors").read_bytes() == before


def _write(tmp_path: Path, d: dict) -> Path:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


def test_resume_refuses_other_data_and_shards_prepared_again(tmp_path):
    """--resume trains on the tokens the run started with: a --data naming other files is refused, and so are
    shards that another run prepared again in a shared shards_dir."""
    from llmos.errors import DataError, InvalidRequestError

    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "u.txt").write_text(TEXT.replace("the", "a"), encoding="utf-8")
    shards = str(tmp_path / "shards")
    train(TrainConfig(**settings(tmp_path, "a", max_steps=4, shards_dir=shards)))
    with pytest.raises(InvalidRequestError, match="--data .*u.txt differs"):
        train(TrainConfig(**settings(tmp_path, "a", max_steps=4, shards_dir=shards, resume=True,
                                     data=[str(tmp_path / "u.txt")])))
    train(TrainConfig(**settings(tmp_path, "b", max_steps=4, shards_dir=shards, data=[str(tmp_path / "u.txt")])))
    with pytest.raises(DataError, match="prepared again since this run started"):
        train(TrainConfig(**settings(tmp_path, "a", max_steps=4, shards_dir=shards, resume=True)))
