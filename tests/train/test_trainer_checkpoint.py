"""Checkpoints survive a full disk; init_from, architectures, the run directory's files, and the CLI's errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import llmos
from llmos.errors import InvalidRequestError
from llmos.model.config import ModelConfig
from llmos.model.loader import load_model, save_model
from llmos.model.transformer import build_model
from llmos.train import trainer as trainer_module
from llmos.train.trainer import CheckpointWriteError, TrainConfig, flops_per_token, train

TEXT = "".join(f"Line {i}: in the beginning was the word, and the word was with light.\n" for i in range(200))
SRC = str(Path(llmos.__file__).resolve().parents[1])


def tiny(tmp_path: Path, out: str = "run", **overrides) -> TrainConfig:
    d = dict(data=[str(tmp_path / "t.txt")], out_dir=str(tmp_path / out), vocab_size=300, hidden_size=16,
             num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, seq_len=16, batch_size=2, max_steps=6,
             warmup_steps=1, lr=3e-3, min_lr=3e-4, eval_interval=100, eval_steps=1, log_interval=1, save_interval=2,
             num_threads=1, progress=False, seed=2, device="cpu")
    d.update(overrides)
    return TrainConfig(**d)


@pytest.fixture
def text(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")


def losses(out: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]


@pytest.mark.parametrize("writer", ["llmos.model.loader.save_file", "llmos.train.trainer.save_file"])
def test_a_full_disk_during_checkpointing_keeps_the_previous_checkpoint(tmp_path, text, monkeypatch, writer):
    """The second checkpoint write fails with ENOSPC: a clear error, checkpoints/last still holds step 2 whole,
    no temporary directories are left, and --resume then finishes with the uninterrupted run's losses."""
    module, name = writer.rsplit(".", 1)
    real = getattr(__import__(module, fromlist=[name]), name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("filename"))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, failing)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*previous checkpoint there is intact.*--resume"):
        train(tiny(tmp_path))
    monkeypatch.setattr(writer, real)
    out = tmp_path / "run"
    last = out / "checkpoints" / "last"
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 2
    load_model(last)  # whole and loadable
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last", "tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "t.txt"]
    assert not (out / "config.json").exists()
    assert json.loads((out / "progress.json").read_text())["state"] == "failed"

    train(tiny(tmp_path, resume=True))
    train(tiny(tmp_path, "reference"))
    assert losses(out) == losses(tmp_path / "reference")


def gpt2_checkpoint(path: Path, context: int = 32) -> Path:
    from llmos.train.bpe import save_tokenizer, train_tokenizer_from_texts

    config = ModelConfig(model_type="gpt2", vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                         intermediate_size=64, max_position_embeddings=context, tie_word_embeddings=True,
                         attention_bias=True, o_proj_bias=True, mlp_bias=True, hidden_act="gelu_new",
                         bos_token_id=0, eos_token_ids=[0])
    torch.manual_seed(0)
    save_model(build_model(config), config, path)
    save_tokenizer(train_tokenizer_from_texts([TEXT], 300), path, context)
    return path


def test_init_from_another_architecture_or_a_longer_context_is_refused(tmp_path, text):
    ckpt = gpt2_checkpoint(tmp_path / "gpt2")
    with pytest.raises(InvalidRequestError, match="is a 'gpt2' checkpoint but --arch is 'llama'.*--arch gpt2"):
        train(tiny(tmp_path, init_from=str(ckpt), arch="llama"))
    with pytest.raises(InvalidRequestError, match=r"--seq-len 64 is above the context of .* \(32 tokens\)"):
        train(tiny(tmp_path, init_from=str(ckpt), arch="gpt2", seq_len=64))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    from llmos.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="'bert'.*not supported"):
        train(tiny(tmp_path, init_from=str(bert)))
    bert.joinpath("config.json").unlink()
    bert.rmdir()
    (ckpt / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    with pytest.raises(InvalidRequestError, match="has no tokenizer.json; pass --tokenizer"):
        train(tiny(tmp_path, init_from=str(ckpt), arch="gpt2"))
    (tmp_path / "tokenizer.json").rename(ckpt / "tokenizer.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "t.txt"]  # nothing written
    from llmos.train.config import load_config

    assert load_config(None, [f"init_from={ckpt}"]).arch == "gpt2"  # without --arch, it follows the checkpoint


def test_continued_pretraining_from_a_checkpoint(tmp_path, text):
    ckpt = gpt2_checkpoint(tmp_path / "gpt2")
    summary = train(tiny(tmp_path, init_from=str(ckpt), arch="gpt2", max_steps=4))
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert (out / "tokenizer.json").read_text() == (ckpt / "tokenizer.json").read_text()  # its tokenizer, reused
    before, _ = load_model(ckpt)
    after, _ = load_model(out)
    assert not torch.equal(before.transformer.h[0].mlp.c_fc.weight, after.transformer.h[0].mlp.c_fc.weight)
    assert summary["state"] == "finished" and summary["steps"] == 4


def test_gpt2_from_scratch_loads_in_transformers_with_the_same_logits(tmp_path, text):
    transformers = pytest.importorskip("transformers")
    train(tiny(tmp_path, arch="gpt2", num_heads=2, intermediate_size=64, max_steps=3))
    out = tmp_path / "run"
    ours, config = load_model(out)
    assert config.model_type == "gpt2" and config.max_position_embeddings == 16
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).float(), theirs(ids).logits.float(), atol=1e-4, rtol=0)


def test_run_directory_files_and_the_mfu_formula(tmp_path, text):
    c = tiny(tmp_path, max_steps=4, eval_interval=2)
    train(c)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    assert set(train_rows[0]) >= {"step", "tokens", "lr", "train_loss", "tokens_per_s", "elapsed_s", "mfu"}
    assert [r["tokens"] for r in train_rows] == [32 * s for s in (1, 2, 3, 4)]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert set(evals[0]) == {"step", "tokens", "val_loss", "val_perplexity", "elapsed_s"}
    progress = json.loads((out / "progress.json").read_text())
    assert {"step", "total_steps", "tokens", "train_loss", "val_loss", "tokens_per_s", "eta_s", "state"} <= set(progress)
    assert (progress["step"], progress["total_steps"], progress["state"]) == (4, 4, "finished")
    best = json.loads((out / "checkpoints" / "best" / "eval.json").read_text())
    assert best["val_loss"] == min(r["val_loss"] for r in evals)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    import yaml

    assert TrainConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text())) == c
    _, mconfig = load_model(out)
    n = mconfig.num_parameters()
    assert flops_per_token(mconfig, n, 16) == 6 * n + 12 * 1 * 16 * 16  # 6N + 12 * layers * hidden * seq_len


def test_lora_needs_the_finetune_module_or_calls_it(tmp_path, text, monkeypatch):
    """With lora_rank > 0 the trainer calls finetune.prepare_model before and finalize_model (on a copy) at saves."""
    ckpt = gpt2_checkpoint(tmp_path / "gpt2")
    seen = []
    fake = types.ModuleType("llmos.train.finetune")

    def prepare_model(config, model):
        seen.append("prepare")
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("c_attn.weight"))
        return model

    def finalize_model(config, model):
        seen.append("finalize")
        return model

    fake.prepare_model, fake.finalize_model = prepare_model, finalize_model
    fake.lora_target_modules = lambda model_config, targets: list(targets)  # the early check of --lora-targets
    monkeypatch.setitem(sys.modules, "llmos.train.finetune", fake)
    monkeypatch.setattr(llmos.train, "finetune", fake, raising=False)
    train(tiny(tmp_path, init_from=str(ckpt), arch="gpt2", lora_rank=4, max_steps=2))
    assert seen[0] == "prepare" and "finalize" in seen
    before, _ = load_model(ckpt)
    after, _ = load_model(tmp_path / "run")
    assert torch.equal(before.transformer.h[0].mlp.c_fc.weight, after.transformer.h[0].mlp.c_fc.weight)  # frozen
    assert not torch.equal(before.transformer.h[0].attn.c_attn.weight, after.transformer.h[0].attn.c_attn.weight)
    state = json.loads((tmp_path / "run" / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "trainer_state.safetensors"))
    assert {k for k in saved if k.startswith("model/")} == {"model/transformer.h.0.attn.c_attn.weight"}


# ---- the command line -----------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "llmos.cli.train_cmd", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, text):
    result = run_cli("--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run"), "--set", "seq_len=long",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --seq-len (seq_len) must be int, got 'long'."]
    result = run_cli("--out", str(tmp_path / "nothing"), "--resume", cwd=tmp_path)
    assert result.returncode == 2 and "nothing to resume" in result.stderr and "Traceback" not in result.stderr


def test_cli_config_file_with_overrides_trains(tmp_path, text):
    (tmp_path / "c.toml").write_text(
        f'data = ["{tmp_path / "t.txt"}"]\nout_dir = "{tmp_path / "run"}"\nvocab_size = 300\nhidden_size = 16\n'
        'num_layers = 1\nnum_heads = 2\nnum_kv_heads = 1\nintermediate_size = 32\nseq_len = 16\nbatch_size = 2\n'
        'max_steps = 50\nnum_threads = 1\ndevice = "cpu"\n')
    result = run_cli("--config", str(tmp_path / "c.toml"), "--set", "max_steps=3", "--set", "eval_steps=1",
                     "--seed", "9", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["max_steps"], saved["seed"], saved["hidden_size"], saved["progress"]) == (3, 9, 16, False)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_detach_hands_the_resolved_config_to_the_jobs_module(tmp_path, text, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from llmos.cli.train_cmd import train_command

    submitted = []
    fake = types.ModuleType("llmos.cli.jobs_cmd")
    fake.submit = submitted.append
    monkeypatch.setitem(sys.modules, "llmos.cli.jobs_cmd", fake)
    app = typer.Typer()
    app.command()(train_command)
    result = CliRunner().invoke(app, ["--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "job"),
                                      "--max-steps", "7", "--detach"])
    assert result.exit_code == 0, result.output
    assert len(submitted) == 1 and isinstance(submitted[0], TrainConfig)
    assert submitted[0].max_steps == 7 and submitted[0].out_dir == str(tmp_path / "job")
    assert not (tmp_path / "job").exists()  # the daemon runs it, not this process


def test_nproc_relaunches_under_torchrun(tmp_path, text, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from llmos.cli.train_cmd import train_command
    from llmos.train import distributed

    launched = []

    def launch(nproc, args, progress_file=None):
        import yaml

        launched.append((nproc, yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())))
        return 0

    monkeypatch.setattr(distributed, "launch", launch)
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    app = typer.Typer()
    app.command()(train_command)
    result = CliRunner().invoke(app, ["--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "r"), "--nproc", "2",
                                      "--batch-size", "4", "--dist", "fsdp"])
    assert result.exit_code == 0, result.output
    assert launched[0][0] == 2 and launched[0][1]["dist"] == "fsdp" and launched[0][1]["batch_size"] == 4
    assert trainer_module  # the trainer itself was never called in this process
    assert not (tmp_path / "r").exists()


def test_sft_loss_counts_only_the_masked_targets(tmp_path):
    """--task sft on chat JSONL: the logged first-step loss is the initial model's cross-entropy over the
    assistant tokens of batch (0, 0) only (recomputed here from the shards and the same seeded model)."""
    import torch.nn.functional as F

    from llmos.train.loader import IGNORE_INDEX, BatchSampler
    from llmos.train.trainer import make_model, open_data

    lines = [json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                      {"role": "assistant", "content": f"It is {2 * i}."}]}) for i in range(150)]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    c = tiny(tmp_path, data=[str(tmp_path / "chat.jsonl")], task="sft", chat_tokens=True, max_steps=1,
             save_interval=0, seq_len=32, batch_size=4)
    train(c)
    out = tmp_path / "run"
    data = open_data(out / "data", out / "checkpoints" / "tokenizer")
    assert data.manifest["kind"] == "sft"
    model, _ = make_model(c, data)
    batch = BatchSampler(data.train, c.batch_size, c.seq_len, c.seed).batch(0, 0)
    assert 0 < batch.num_targets < batch.targets.numel()  # the user turns and separators do not count
    with torch.no_grad():
        expected = F.cross_entropy(model(batch.inputs).flatten(0, 1), batch.targets.flatten(),
                                   ignore_index=IGNORE_INDEX).item()
    assert losses(out)[0] == pytest.approx(expected, rel=1e-6)


def test_lstm_trains_from_scratch_and_resumes_exactly(tmp_path, text, monkeypatch):
    """--arch lstm (llmos.model.lstm, issue 5's LSTM part): the same loop, checkpoints and exact resume."""
    import llmos.model.loader as loader

    c = tiny(tmp_path, arch="lstm", num_layers=2)
    real, calls = loader.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the step-4 checkpoint fails: the run stops with step 2 saved
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "save_file", failing)
    with pytest.raises(CheckpointWriteError):
        train(c)
    monkeypatch.setattr(loader, "save_file", real)
    train(tiny(tmp_path, arch="lstm", num_layers=2, resume=True))
    train(tiny(tmp_path, "reference", arch="lstm", num_layers=2))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_type"] == "llmos_lstm"
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")
    load_model(tmp_path / "run")


def test_bf16_autocast_trains_close_to_fp32(tmp_path, text):
    train(tiny(tmp_path, "fp32", dtype="float32", max_steps=3))
    train(tiny(tmp_path, "bf16", dtype="bfloat16", max_steps=3))
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert a != b  # autocast really ran in bf16
    assert all(abs(x - y) < 0.02 * x for x, y in zip(a, b))


def test_lora_with_peft_resumes_exactly_and_saves_the_adapter(tmp_path, text, monkeypatch):
    """The real LoRA (llmos.train.finetune, issue 5's finetune part, through peft): a run stopped by a failed
    checkpoint and resumed logs the uninterrupted run's losses; lora_merge: false also writes adapter/."""
    import llmos.model.loader as loader

    ckpt = gpt2_checkpoint(tmp_path / "gpt2")
    lora = dict(init_from=str(ckpt), arch="gpt2", lora_rank=4, lora_merge=False, lr=1e-2, eval_interval=3)
    real, calls = loader.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # last at step 2, best at step 3, then last at step 3 fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "save_file", failing)
    with pytest.raises(CheckpointWriteError):
        train(tiny(tmp_path, **lora))
    monkeypatch.setattr(loader, "save_file", real)
    train(tiny(tmp_path, resume=True, **lora))
    train(tiny(tmp_path, "reference", **lora))
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    merged, _ = load_model(tmp_path / "run")
    base, _ = load_model(ckpt)
    assert not torch.equal(merged.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(merged.transformer.h[0].mlp.c_fc.weight, base.transformer.h[0].mlp.c_fc.weight)


def test_the_fused_head_and_loss_give_the_plain_losses(tmp_path, text, monkeypatch):
    """With llmos.train.fast (issue 5's bench part) one process trains through the fused LM head + chunked
    cross-entropy; its losses equal the plain `F.cross_entropy` loop's up to rounding."""
    from llmos.model.transformer import build_model as build

    model = build(trainer_module.model_config_for(tiny(tmp_path), 300, 0))
    assert trainer_module.fused_loss_module(tiny(tmp_path), model, distributed=False) is not None
    assert trainer_module.fused_loss_module(tiny(tmp_path), model, distributed=True) is None
    train(tiny(tmp_path, "fused", max_steps=4))
    monkeypatch.setattr(trainer_module, "fused_loss_module", lambda *args, **kwargs: None)
    train(tiny(tmp_path, "plain", max_steps=4))
    fused, plain = losses(tmp_path / "fused"), losses(tmp_path / "plain")
    assert len(fused) == 4 and all(abs(a - b) <= 1e-5 * b for a, b in zip(fused, plain))


# ---- a full disk, a read-only directory, a busy or finished --out, shards_dir ------------------------------


def test_a_safetensors_write_error_is_a_checkpoint_write_error(tmp_path, text, monkeypatch):
    """safetensors' Rust writer reports ENOSPC as SafetensorError (not an OSError): the same one-line error,
    checkpoints/last keeps step 2 whole, no temporaries are left, and --resume finishes the run exactly."""
    from safetensors import SafetensorError

    import llmos.model.loader as loader

    real, calls = loader.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "save_file", failing)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*previous checkpoint there is intact"):
        train(tiny(tmp_path))
    monkeypatch.setattr(loader, "save_file", real)
    out = tmp_path / "run"
    assert json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last", "tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "t.txt"]
    train(tiny(tmp_path, resume=True))
    train(tiny(tmp_path, "reference"))
    assert losses(out) == losses(tmp_path / "reference")


def test_a_failed_progress_write_is_a_checkpoint_write_error(tmp_path, text, monkeypatch):
    """progress.json / metrics.jsonl go through `atomic_write`: its ENOSPC is the documented error, not an OSError."""
    import llmos.train.checkpoint as checkpoint

    real, calls = checkpoint.tempfile.mkstemp, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", "progress.json")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", failing)
    with pytest.raises(CheckpointWriteError, match="could not write progress.json: No space left on device"):
        train(tiny(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="runs as root, which ignores directory permissions (chmod)")
def test_a_read_only_run_directory_is_one_error_line_and_exit_2(tmp_path, text):
    out = tmp_path / "run"
    assert run_cli("--data", str(tmp_path / "t.txt"), "--out", str(out), "--set", "max_steps=2", "--set",
                   "hidden_size=16", "--set", "num_layers=1", "--set", "vocab_size=300", "--set", "seq_len=16",
                   "--threads", "1", cwd=tmp_path).returncode == 0
    (out / "summary.json").unlink()  # keep it a run to resume: drop the final checkpoint's marker files
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    os.chmod(out, 0o555)
    try:
        result = run_cli("--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run"), "--set",
                         "max_steps=2", "--threads", "1", cwd=tmp_path)
    finally:
        os.chmod(out, 0o755)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_failed_new_run_leaves_a_finished_run_untouched(tmp_path, text):
    """A new run into a finished run's --out trains beside it (.run.run-PID) and is swapped in only when it
    finishes: one that diverges leaves the old directory byte for byte as it was, and nothing beside it."""
    train(tiny(tmp_path, max_steps=4))
    out = tmp_path / "run"
    before = snapshot(out)
    assert "checkpoints/last/model.safetensors" in before and "summary.json" in before
    with pytest.raises(llmos.errors.TrainingDivergedError):
        train(tiny(tmp_path, lr=1e9, min_lr=1e8, grad_clip=0.0, seed=3))
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "t.txt"]
    summary = train(tiny(tmp_path, max_steps=3))  # a new run that finishes replaces it whole
    assert summary["steps"] == 3 and json.loads((out / "summary.json").read_text())["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "t.txt"]


def test_a_second_run_into_a_busy_out_is_refused(tmp_path, text):
    """Two real processes: the second `llmos train` into the same --out stops at the run lock, exit 2."""
    common = ["--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run"), "--threads", "1",
              "--set", "hidden_size=16", "--set", "num_layers=1", "--set", "num_heads=2", "--set", "num_kv_heads=1",
              "--set", "intermediate_size=32", "--set", "vocab_size=300", "--set", "seq_len=16",
              "--set", "batch_size=2", "--set", "device=cpu"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "llmos.cli.train_cmd", *common, "--set", "max_steps=100000"],
                             env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / ".run.lock"
        for _ in range(3000):
            if lock.is_file() and lock.read_text().strip() == str(first.pid):
                break
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.01)
        result = run_cli(*common, "--set", "max_steps=2", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"error: {tmp_path / 'run'} is being written by another llmos train (pid {first.pid}); wait for it or "
            "choose another --out."]
    finally:
        first.kill()
        first.wait()
    from llmos.train.checkpoint import lock_run

    lock_run(tmp_path / "run").release()  # a killed holder's lock is free


def test_shards_dir_prepares_or_reuses_what_matches_the_data(tmp_path, text):
    """shards_dir with --data: reused if its manifest matches the data and settings, re-prepared there if not,
    prepared there if it has no manifest yet."""
    import shutil

    train(tiny(tmp_path, "a", max_steps=2))
    shards = tmp_path / "shards"
    shutil.copytree(tmp_path / "a" / "data", shards)
    manifest = (shards / "manifest.json").read_text()
    train(tiny(tmp_path, "b", shards_dir=str(shards), max_steps=2))  # the same data and settings: reused
    assert (shards / "manifest.json").read_text() == manifest
    (tmp_path / "u.txt").write_text(TEXT.replace("word", "world"), encoding="utf-8")
    train(tiny(tmp_path, "c", data=[str(tmp_path / "u.txt")], shards_dir=str(shards), max_steps=2))
    assert json.loads((shards / "manifest.json").read_text())["sources"][0]["path"] == str(tmp_path / "u.txt")
    train(tiny(tmp_path, "d", shards_dir=str(tmp_path / "new-shards"), max_steps=2))  # no manifest: prepared there
    assert (tmp_path / "new-shards" / "manifest.json").is_file()


def test_shards_dir_with_a_manifest_follows_data(tmp_path, text):
    """The shards of a finished run as shards_dir: --data naming a missing file is an error; without --data
    the shards are used as they are (with the run's tokenizer)."""
    train(tiny(tmp_path, "a", max_steps=2))
    shards = tmp_path / "a" / "data"
    with pytest.raises(llmos.errors.DataError):
        train(tiny(tmp_path, "b", data=[str(tmp_path / "missing.txt")], shards_dir=str(shards), max_steps=2))
    assert not (tmp_path / "b" / "config.json").exists()
    summary = train(tiny(tmp_path, "c", data=[], shards_dir=str(shards), max_steps=2))
    assert summary["state"] == "finished"


def test_a_resume_cleans_what_a_killed_save_left_behind(tmp_path, text, monkeypatch):
    """Temporary checkpoints of a dead writer (`checkpoints/.last.tmp-*`) and a dead run's final directory
    beside --out are deleted, under the run lock, when the run is resumed."""
    import llmos.model.loader as loader

    real, calls = loader.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "save_file", failing)
    with pytest.raises(CheckpointWriteError):
        train(tiny(tmp_path))
    monkeypatch.setattr(loader, "save_file", real)
    out = tmp_path / "run"
    for stale in (out / "checkpoints" / ".last.tmp-x1y2", tmp_path / ".run.final-12345"):
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"half")
    assert train(tiny(tmp_path, resume=True))["state"] == "finished"
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "t.txt"]


def test_a_lora_run_reports_the_saved_models_parameters(tmp_path, text):
    ckpt = gpt2_checkpoint(tmp_path / "gpt2")
    summary = train(tiny(tmp_path, init_from=str(ckpt), arch="gpt2", lora_rank=4, max_steps=2))
    saved, _ = load_model(tmp_path / "run")
    assert summary["parameters"] == sum(p.numel() for p in {id(p): p for p in saved.parameters()}.values())
    assert 0 < summary["trainable_parameters"] < summary["parameters"]


def test_bad_lora_targets_fail_before_anything_is_written(tmp_path, text):
    ckpt = gpt2_checkpoint(tmp_path / "gpt2")
    with pytest.raises(llmos.errors.InvalidRequestError, match="--lora-targets nope"):
        train(tiny(tmp_path, "lora", init_from=str(ckpt), arch="gpt2", lora_rank=2, lora_targets=["nope"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "t.txt"]


def test_a_failed_final_swap_keeps_the_finished_model_and_names_it(tmp_path, text, monkeypatch):
    """A new run into a finished --out whose final swap fails (an immutable --out: EPERM) loses nothing: the
    trained model lands in a visible `<name>.finished-*` folder that the error names and no later run deletes,
    and the old run is left whole."""
    from llmos.train import checkpoint as checkpoint_module

    train(tiny(tmp_path, max_steps=4))
    out = tmp_path / "run"
    before = snapshot(out)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".run.final-") and Path(dst) == out:
            raise OSError(errno.EPERM, "Operation not permitted", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    with pytest.raises(CheckpointWriteError) as e:
        train(tiny(tmp_path, max_steps=3))
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.finished-")]
    assert len(kept) == 1 and str(kept[0]) in str(e.value) and "\n" not in str(e.value)
    assert json.loads((kept[0] / "summary.json").read_text())["steps"] == 3
    assert (kept[0] / "config.json").is_file() and (kept[0] / "checkpoints" / "last" / "trainer_state.json").is_file()
    assert snapshot(out) == before
    train(tiny(tmp_path, max_steps=2))  # the next run's cleaning keeps it
    assert (kept[0] / "config.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_a_save_killed_between_its_two_renames_is_recovered(tmp_path, text, monkeypatch):
    """A SIGKILL between `last` -> `.last.old-PID` and `.last.tmp-*` -> `last` leaves no `last`: --resume puts
    back the whole new one (a `.last.tmp-*` with trainer_state.json, written last) or else the old one, and
    deletes `.last.old-*` once `last` exists."""
    import shutil

    from llmos.train import checkpoint as checkpoint_module

    import llmos.model.loader as loader

    real, calls = loader.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second checkpoint (model, then trainer state, per save)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "save_file", failing)
    with pytest.raises(CheckpointWriteError):
        train(tiny(tmp_path))
    monkeypatch.setattr(loader, "save_file", real)
    out = tmp_path / "run"
    ck = out / "checkpoints"
    # killed mid-swap with only the old checkpoint aside: resume continues from it
    os.replace(ck / "last", ck / ".last.old-999")
    (ck / ".last.tmp-half").mkdir()  # an unfinished write: no trainer_state.json
    (ck / ".last.tmp-half" / "model.safetensors").write_bytes(b"half")
    assert train(tiny(tmp_path, resume=True))["state"] == "finished"
    assert losses(out) == losses_of_fresh(tmp_path)
    assert not [p.name for p in ck.iterdir() if p.name.startswith(".")]
    # a whole new checkpoint in .last.tmp-* wins over the old one; a leftover .old-* beside `last` is deleted
    os.replace(ck / "last", ck / ".last.old-998")
    shutil.copytree(ck / ".last.old-998", ck / ".last.tmp-whole")
    (ck / ".last.tmp-whole" / "marker").write_text("new")
    checkpoint_module.clean_stale(out)
    assert (ck / "last" / "marker").is_file()
    assert not [p.name for p in ck.iterdir() if p.name.startswith(".")]
    shutil.copytree(ck / "last", ck / ".last.old-997")
    checkpoint_module.clean_stale(out)
    assert not [p.name for p in ck.iterdir() if p.name.startswith(".")]


def losses_of_fresh(tmp_path: Path) -> list[float]:
    train(tiny(tmp_path, out="fresh"))
    return losses(tmp_path / "fresh")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 RENAME_EXCHANGE is Linux's")
def test_replacing_a_checkpoint_is_one_atomic_exchange_on_linux(tmp_path, monkeypatch):
    """Where the file system can exchange two directories, a save over a checkpoint never has a moment
    without one: no `.<name>.old-*` step that a SIGKILL could interrupt."""
    import llmos.model.loader as loader

    probe = [tmp_path / "probe-a", tmp_path / "probe-b"]
    for p in probe:
        p.mkdir()
    if not loader._exchange(*probe):
        pytest.skip("this file system cannot exchange directories")
    for p in probe:
        p.rmdir()
    cfg = ModelConfig(model_type="gpt2", vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=True, attention_bias=True,
                      o_proj_bias=True, mlp_bias=True, hidden_act="gelu_new", bos_token_id=0, eos_token_ids=[0])
    path = tmp_path / "ckpt"
    save_model(build_model(cfg), cfg, path)
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        assert ".old-" not in Path(dst).name, "swapped through an .old- directory"
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(loader.os, "replace", replace)
    model = build_model(cfg)
    save_model(model, cfg, path)
    monkeypatch.setattr(loader.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    got = load_model(path)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), got.state_dict().values()))


def test_a_resumed_new_run_into_a_finished_checkpoint_replaces_it_at_the_end(tmp_path, text, monkeypatch):
    """A new run into a finished --out trains in `.<name>.run-<pid>`; stopped there and resumed with
    `--out .<name>.run-<pid> --resume` (what its message says), it still replaces --out when it finishes."""
    import llmos.model.loader as loader

    train(tiny(tmp_path, max_steps=2))
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    real, calls = loader.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint of the new run fails: it stops with a resumable work dir
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "save_file", failing)
    with pytest.raises(CheckpointWriteError):
        train(tiny(tmp_path, max_steps=6, seed=9))
    monkeypatch.setattr(loader, "save_file", real)
    [work] = [p for p in tmp_path.iterdir() if p.name.startswith(".run.run-")]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == first  # untouched meanwhile
    train(tiny(tmp_path, work.name, max_steps=6, seed=9, resume=True))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6
    assert not work.exists()
