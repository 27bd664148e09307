"""llmos.train end to end: tiny runs on tiny text, checked against transformers as the oracle."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmos.errors import DataError, InvalidRequestError
from llmos.train.bpe import min_vocab_size, train_tokenizer
from llmos.train.sources import iter_documents
from llmos.train.evaluate import perplexity
from llmos.train.trainer import TrainConfig, get_lr, train

TEXT = (
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n"
    "And God said, Let there be light: and there was light.\n"
    "And God saw the light, that it was good: and God divided the light from the darkness.\n"
)


def tiny_config(tmp_path, data, **overrides) -> TrainConfig:
    settings = dict(
        data=[str(d) for d in data], out_dir=str(tmp_path / "ckpt"), vocab_size=300, hidden_size=32, num_layers=2,
        num_heads=4, num_kv_heads=2, intermediate_size=64, seq_len=32, batch_size=4, max_steps=12,
        warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_interval=6, eval_steps=2, log_interval=1,
        num_threads=1, progress=False, seed=0,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the interop tests."""
    tmp_path = tmp_path_factory.mktemp("run")
    (tmp_path / "a.txt").write_text(TEXT * 12, encoding="utf-8")
    (tmp_path / "b.md").write_text("# Notes\n\n" + TEXT.upper() * 6, encoding="utf-8")
    config = tiny_config(tmp_path, [tmp_path / "a.txt", tmp_path / "b.md"])
    summary = train(config)
    return config, summary


def test_checkpoint_files(trained):
    config, summary = trained
    out = config.out_dir
    names = {p.name for p in __import__("pathlib").Path(out).iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "metrics.jsonl", "config.yaml", "progress.json", "loss.png", "summary.json",
            "data", "checkpoints"} <= names
    assert json.loads(open(f"{out}/progress.json").read())["state"] == "finished"
    last = __import__("pathlib").Path(out) / "checkpoints" / "last"
    assert json.loads((last / "trainer_state.json").read_text())["step"] == config.max_steps
    assert json.loads((__import__("pathlib").Path(out) / "checkpoints" / "best" / "eval.json").read_text())["step"] in (6, 12)
    hf = json.loads(open(f"{out}/config.json").read())
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
    assert hf["max_position_embeddings"] == config.seq_len and hf["tie_word_embeddings"] is True
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, config.max_steps + 1))
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    assert math.isclose(summary["val_perplexity"], math.exp(summary["val_loss"]))
    assert not any(p.name.startswith(".ckpt") for p in __import__("pathlib").Path(out).parent.iterdir())


def test_transformers_loads_the_checkpoint_with_the_same_logits(trained):
    transformers = pytest.importorskip("transformers")
    from llmos.model.loader import load_model

    config, _ = trained
    ours, _ = load_model(config.out_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(config.out_dir, attn_implementation="eager").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, config.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids).float()
        b = theirs(ids).logits.float()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_tokenizer_loads_in_transformers_and_llmos(trained):
    transformers = pytest.importorskip("transformers")
    from llmos.model.tokenizer import Tokenizer

    config, _ = trained
    hf = transformers.AutoTokenizer.from_pretrained(config.out_dir)
    ours = Tokenizer.from_dir(config.out_dir)
    text = "And God said, Let there be light. Ünïcödé ✓"
    assert hf(text)["input_ids"] == ours.encode(text)
    ids = ours.encode(text)
    assert ids[0] == ours.bos_token_id == hf.bos_token_id == hf.eos_token_id  # <|endoftext|> is BOS and EOS
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
    assert ours.eos_token_ids == [ours.bos_token_id]


def test_loss_decreases_on_learnable_text(tmp_path):
    (tmp_path / "abc.txt").write_text("a b c d e f g h i j k l m n o p\n" * 200, encoding="utf-8")
    config = tiny_config(tmp_path, [tmp_path / "abc.txt"], max_steps=30, lr=1e-2, min_lr=1e-3, eval_interval=30)
    summary = train(config)
    rows = [json.loads(line) for line in open(f"{config.out_dir}/metrics.jsonl") if "train_loss" in line]
    first = rows[0]["train_loss"]
    assert first > 4.0  # about ln(vocab) at the start
    assert summary["train_loss"] < 0.3 * first
    assert summary["val_loss"] < 0.3 * first
    from llmos.model.loader import load_model
    from llmos.model.tokenizer import Tokenizer

    model, _ = load_model(config.out_dir)
    assert perplexity(model, Tokenizer.from_dir(config.out_dir), "a b c d e f g h i j k\n" * 10, 32) < 3.0


def test_same_seed_same_weights(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT * 8, encoding="utf-8")
    from safetensors.torch import load_file

    weights = []
    for name in ("one", "two"):
        config = tiny_config(tmp_path, [tmp_path / "t.txt"], out_dir=str(tmp_path / name), max_steps=4, eval_interval=4)
        train(config)
        weights.append(load_file(f"{config.out_dir}/model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=0, rtol=0)


def test_reusing_a_tokenizer_and_restoring_threads(tmp_path, trained):
    (tmp_path / "t.txt").write_text(TEXT * 8, encoding="utf-8")
    first, _ = trained
    threads = torch.get_num_threads()
    config = tiny_config(tmp_path, [tmp_path / "t.txt"], tokenizer=first.out_dir, vocab_size=1, max_steps=2,
                         eval_interval=2, num_threads=1)
    train(config)
    assert torch.get_num_threads() == threads
    a = json.loads(open(f"{first.out_dir}/tokenizer.json").read())["model"]["vocab"]
    b = json.loads(open(f"{config.out_dir}/tokenizer.json").read())["model"]["vocab"]
    assert a == b


def test_existing_checkpoint_is_replaced_whole(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT * 8, encoding="utf-8")
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an older checkpoint: replacing it whole is the contract
    (out / "stale.txt").write_text("from an older run")
    train(tiny_config(tmp_path, [tmp_path / "t.txt"], max_steps=2, eval_interval=2, save_dtype="bfloat16"))
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "t.txt"]  # no temporary or work directories


# ---- bad input ----------------------------------------------------------------------------------


def test_empty_file_is_a_data_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="empty.txt is empty"):
        train(tiny_config(tmp_path, [tmp_path / "empty.txt"]))
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]  # nothing written


def test_binary_file_is_a_data_error(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="blob.txt looks binary"):
        train(tiny_config(tmp_path, [tmp_path / "blob.txt"]))


def test_non_utf8_file_is_a_data_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not UTF-8.*iconv"):
        list(iter_documents([tmp_path]))


def test_missing_and_empty_folder_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents([tmp_path / "nope"]))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="contains no .txt, .md, .jsonl or .csv files"):
        list(iter_documents([tmp_path / "dir"]))


def test_too_small_vocab_is_a_data_error(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    assert min_vocab_size() == 257
    with pytest.raises(DataError, match="at least 257"):
        train(tiny_config(tmp_path, [tmp_path / "t.txt"], vocab_size=256))
    with pytest.raises(DataError, match="at least 257"):
        train_tokenizer([tmp_path / "t.txt"], 100, tmp_path / "tok")


def test_too_little_text_is_a_data_error(tmp_path):
    (tmp_path / "t.txt").write_text("Amen.")
    with pytest.raises(DataError, match="too short"):
        train(tiny_config(tmp_path, [tmp_path / "t.txt"]))


def test_bad_hyperparameters_are_invalid_requests(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    with pytest.raises(InvalidRequestError, match="multiple of --heads"):
        train(tiny_config(tmp_path, [tmp_path / "t.txt"], hidden_size=30))
    with pytest.raises(InvalidRequestError, match="--kv-heads"):
        train(tiny_config(tmp_path, [tmp_path / "t.txt"], num_kv_heads=3))


# ---- pieces -------------------------------------------------------------------------------------


def test_tokenizer_files_load_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "t.txt").write_text(TEXT * 4)
    tok = train_tokenizer([tmp_path / "t.txt"], 320, tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert hf("light")["input_ids"] == tok.encode("light").ids
    assert tok.encode("light").ids[0] == tok.token_to_id("<|endoftext|>") == 0


def test_lr_schedule():
    c = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert get_lr(0, c) == pytest.approx(1e-4)
    assert get_lr(9, c) == pytest.approx(1e-3)
    assert get_lr(10, c) == pytest.approx(1e-3)
    assert get_lr(55, c) == pytest.approx(5.5e-4)
    assert get_lr(100, c) == pytest.approx(1e-4)
    lrs = [get_lr(s, c) for s in range(10, 100)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))


def test_cli_trains_and_reports_bad_input(tmp_path):
    import typer
    from typer.testing import CliRunner

    from llmos.cli.train_cmd import train_command

    app = typer.Typer()
    app.command()(train_command)
    (tmp_path / "t.txt").write_text(TEXT * 8)
    out = tmp_path / "cli-ckpt"
    args = ["--data", str(tmp_path / "t.txt"), "--data", str(tmp_path / "t.txt"), "--out", str(out),
            "--vocab-size", "300", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
            "--intermediate-size", "64", "--seq-len", "16", "--batch-size", "2", "--max-steps", "3",
            "--eval-interval", "3", "--eval-steps", "1", "--threads", "1", "--seed", "3", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"] == [str(tmp_path / "t.txt")] * 2 and saved["seed"] == 3 and saved["num_layers"] == 1
    result = CliRunner().invoke(app, args + ["--vocab-size", "10"])
    assert isinstance(result.exception, DataError)


# ---- the checkpoint target is never a directory of other files (found by a fresh-user review) --------------


@pytest.mark.parametrize("make_target", [
    lambda tmp: tmp / "notes",                 # a directory of someone's files
    lambda tmp: tmp / "file.txt",              # a file
    lambda tmp: tmp,                           # the current directory
    lambda tmp: tmp.parent,                    # a parent of the current directory
])
def test_out_that_is_not_a_checkpoint_is_refused_before_training(tmp_path, monkeypatch, make_target):
    from llmos.errors import ModelLoadError
    from llmos.train.trainer import TrainConfig, train
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.doc").write_text("precious")
    (tmp_path / "file.txt").write_text("precious")
    (tmp_path / "data.txt").write_text("In the beginning God created the heaven and the earth. " * 50)
    monkeypatch.chdir(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ModelLoadError, match="refusing|not a directory|not a model checkpoint"):
        train(TrainConfig(data=[str(tmp_path / "data.txt")], out_dir=str(make_target(tmp_path)), vocab_size=300,
                          hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                          seq_len=16, batch_size=2, max_steps=2, progress=False))
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "notes" / "thesis.doc").read_text() == "precious"


def test_diverged_run_saves_nothing_and_keeps_the_old_checkpoint(tmp_path):
    from llmos.errors import TrainingDivergedError
    from llmos.train.trainer import TrainConfig, train
    (tmp_path / "data.txt").write_text("In the beginning God created the heaven and the earth. " * 50)
    base = dict(data=[str(tmp_path / "data.txt")], out_dir=str(tmp_path / "m"), vocab_size=300, hidden_size=32,
                num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seq_len=16, batch_size=2,
                max_steps=3, progress=False)
    train(TrainConfig(**base))
    weights = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(TrainingDivergedError, match="diverged"):
        train(TrainConfig(**{**base, "lr": 1e30, "min_lr": 0.0, "grad_clip": 0.0, "max_steps": 30}))
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "m"]


def test_compiled_run_trains_like_the_eager_run(tmp_path):
    """`--compile` (inductor on the model body) trains and evaluates, with the eager run's losses to rounding:
    the CPU fast paths step aside while dynamo traces (inductor has its own)."""
    (tmp_path / "a.txt").write_text(TEXT * 12, encoding="utf-8")
    runs = {}
    for compiled in (False, True):
        c = tiny_config(tmp_path / str(compiled), [tmp_path / "a.txt"], compile=compiled, max_steps=4,
                        eval_interval=2)
        runs[compiled] = train(c)
    eager, compiled = runs[False], runs[True]
    assert compiled["state"] == "finished" and compiled["steps"] == 4
    assert math.isclose(eager["val_loss"], compiled["val_loss"], rel_tol=1e-4)
    assert math.isclose(eager["train_loss"], compiled["train_loss"], rel_tol=1e-4)
