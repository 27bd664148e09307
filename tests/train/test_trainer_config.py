"""TrainConfig files and overrides (YAML, TOML, --set), validation messages, and the batch sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmos.errors import DataError, InvalidRequestError
from llmos.train.config import TrainConfig, field_names, load_config, parse_overrides
from llmos.train.loader import IGNORE_INDEX, ArraySplit, BatchSampler

CONTRACT_FIELDS = {
    "arch": "llama", "task": "lm", "init_from": None, "text_field": "text", "messages_field": "messages",
    "text_column": "text", "label_column": "label", "normalize": "none", "clean": False, "dedup": True,
    "shards_dir": None, "chat_tokens": False, "compile": False, "save_interval": 0, "resume": False, "dist": "ddp",
    "nproc": 1, "lora_rank": 0, "lora_alpha": 16.0, "lora_dropout": 0.0,
    "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "lora_merge": True, "zero_shot": False,
}


def test_every_contract_field_exists_with_its_default():
    c = TrainConfig()
    for name, default in CONTRACT_FIELDS.items():
        assert getattr(c, name) == default, name
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert TrainConfig().lora_targets is not c.lora_targets  # no shared mutable default


def test_yaml_and_toml_files_give_the_same_config(tmp_path):
    (tmp_path / "c.yaml").write_text("data: [corpus/]\nout_dir: run\narch: gpt2\nlr: 3e-4\nmax_steps: 50\n"
                                     "compile: true\nlora_targets: [q_proj, v_proj]\n")
    (tmp_path / "c.toml").write_text('data = ["corpus/"]\nout_dir = "run"\narch = "gpt2"\nlr = 3e-4\nmax_steps = 50\n'
                                     'compile = true\nlora_targets = ["q_proj", "v_proj"]\n')
    a, b = load_config(tmp_path / "c.yaml"), load_config(tmp_path / "c.toml")
    assert a == b
    assert (a.arch, a.lr, a.max_steps, a.compile, a.lora_targets) == ("gpt2", 3e-4, 50, True, ["q_proj", "v_proj"])
    assert a.seq_len == TrainConfig().seq_len  # untouched keys keep their defaults


def test_overrides_win_over_the_file_and_flags_over_both(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1.0e-3\nseq_len: 64\nbatch_size: 4\n")
    c = load_config(tmp_path / "c.yaml", ["lr=3e-4", "seq_len=128", "data=a.txt", "lora_targets=q_proj,v_proj",
                                          "max_tokens=1000", "tokenizer="], seq_len=256, batch_size=None)
    assert (c.lr, c.seq_len, c.batch_size, c.data, c.lora_targets, c.max_tokens, c.tokenizer) == (
        3e-4, 256, 4, ["a.txt"], ["q_proj", "v_proj"], 1000, None)
    assert parse_overrides(["warmup-steps=5"]) == {"warmup_steps": 5}


def test_unknown_keys_list_the_valid_ones(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(InvalidRequestError, match="unknown training setting.*learning_rate.*valid keys:.*lr"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(InvalidRequestError, match="--set nope: unknown"):
        load_config(None, ["nope=1"])
    with pytest.raises(InvalidRequestError, match="is not key=value"):
        load_config(None, ["lr"])


def test_bad_files_and_types_are_clear_errors(tmp_path):
    with pytest.raises(InvalidRequestError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "c.ini").write_text("[x]\n")
    with pytest.raises(InvalidRequestError, match="unknown format"):
        load_config(tmp_path / "c.ini")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(InvalidRequestError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.toml").write_text("lr = = 3\n")
    with pytest.raises(InvalidRequestError, match="could not be read"):
        load_config(tmp_path / "broken.toml")
    with pytest.raises(InvalidRequestError, match=r"--seq-len \(seq_len\) must be int, got 'long'"):
        load_config(None, ["seq_len=long"])
    with pytest.raises(InvalidRequestError, match="--compile .* must be bool"):
        load_config(None, ["compile=3"])


@pytest.mark.parametrize("settings, message", [
    (dict(arch="rnn"), "--arch must be one of llama, gpt2, lstm"),
    (dict(task="chat"), "--task must be one of lm, sft, classify"),
    (dict(dist="zero3"), "--dist must be one of ddp, fsdp"),
    (dict(nproc=0), "--nproc must be a positive integer"),
    (dict(save_interval=-1), "--save-interval"),
    (dict(lora_rank=4), "--init-from"),
    (dict(zero_shot=True), "--task classify"),
    (dict(dtype="float16"), "--dtype must be one of auto, float32, bfloat16"),
    (dict(init_from="/nonexistent/model"), "not a checkpoint directory"),
    (dict(arch="gpt2", hidden_size=30, num_heads=4), "multiple of --heads"),
])
def test_validation_messages(settings, message):
    with pytest.raises(InvalidRequestError, match=message):
        TrainConfig(**settings).validate()


def test_lstm_does_not_need_attention_shapes():
    TrainConfig(arch="lstm", num_heads=0, num_kv_heads=0, intermediate_size=0).validate()


def test_every_field_has_a_flag_or_a_set_key():
    import inspect

    from llmos.cli.train_cmd import train_command

    params = inspect.signature(train_command).parameters
    assert {"config", "set_", "resume", "nproc", "detach", "init_from", "arch", "task", "lora_rank", "zero_shot",
            "compile_", "dist"} <= set(params)
    assert set(parse_overrides(f"{n}=1" for n in ("lr", "seed"))) <= set(field_names())


# ---- the batch sampler ---------------------------------------------------------------------------------


class FakeShardSplit:
    """A ShardSplit-compatible object (contract: len() = tokens, window(start, length) -> (int64, bool|None))."""

    def __init__(self, n: int, with_mask: bool) -> None:
        self.tokens = np.arange(n, dtype=np.uint16)
        self.mask = (np.arange(n) % 3 != 0) if with_mask else None
        self.calls = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, start: int, length: int):
        self.calls += 1
        assert 0 <= start and start + length <= len(self.tokens)
        mask = None if self.mask is None else self.mask[start:start + length].copy()
        return self.tokens[start:start + length].astype(np.int64), mask


def test_batches_are_a_pure_function_of_seed_step_and_micro_step():
    split = FakeShardSplit(5000, with_mask=False)
    a = BatchSampler(split, 8, 15, seed=3)
    b = BatchSampler(split, 8, 15, seed=3)
    for step, micro in [(7, 1), (0, 0), (7, 1), (123456, 3)]:
        x, y = a.batch(step, micro), b.batch(step, micro)
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
    assert not torch.equal(a.batch(7, 0).inputs, a.batch(7, 1).inputs)
    assert not torch.equal(a.batch(7, 0).inputs, BatchSampler(split, 8, 15, seed=4).batch(7, 0).inputs)
    batch = a.batch(2, 0)
    assert batch.inputs.shape == batch.targets.shape == (8, 15) and batch.inputs.dtype == torch.int64
    assert torch.equal(batch.targets[:, :-1], batch.inputs[:, 1:])  # targets are inputs shifted by one
    assert batch.num_targets == 8 * 15 == a.global_targets(2, 1)


def test_ranks_read_disjoint_rows_that_make_up_the_global_batch():
    split = FakeShardSplit(5000, with_mask=False)
    whole = BatchSampler(split, 8, 15, seed=1).batch(4, 2)
    parts = [BatchSampler(split, 8, 15, seed=1, rank=r, world_size=4).batch(4, 2) for r in range(4)]
    assert all(p.inputs.shape == (2, 15) for p in parts)
    assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
    with pytest.raises(ValueError):
        BatchSampler(split, 6, 15, seed=1, rank=0, world_size=4)


def test_the_loss_mask_marks_ignored_targets():
    split = FakeShardSplit(3000, with_mask=True)
    sampler = BatchSampler(split, 4, 9, seed=0)
    batch = sampler.batch(0, 0)
    starts = sampler.starts(0, 0)
    for row, s in enumerate(starts):
        for j in range(9):
            counted = split.mask[s + j + 1]  # target j counts iff mask[j + 1] of the window
            assert (batch.targets[row, j].item() != IGNORE_INDEX) == counted
            if counted:
                assert batch.targets[row, j].item() == s + j + 1
    assert batch.num_targets == int((batch.targets != IGNORE_INDEX).sum())
    assert sampler.global_targets(0, 1) == batch.num_targets
    assert sampler.global_targets(0, 2) == batch.num_targets + sampler.batch(0, 1).num_targets


def test_a_split_shorter_than_a_window_is_a_data_error():
    with pytest.raises(DataError, match="shorter than one window"):
        BatchSampler(ArraySplit(np.arange(10)), 2, 10, seed=0)
    split = ArraySplit(np.arange(11, dtype=np.uint32))
    assert BatchSampler(split, 2, 10, seed=0).batch(0).inputs.tolist() == [list(range(10))] * 2


def test_a_malformed_config_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n", encoding="utf-8")
    with pytest.raises(InvalidRequestError) as e:
        load_config(str(bad), [])
    assert "\n" not in str(e.value) and "line 2, column 1" in str(e.value)
