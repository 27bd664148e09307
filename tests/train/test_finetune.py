"""llmos.train.finetune: LoRA through peft on llmos models, merged into plain checkpoints that load in
transformers and the kernel; transformers (and peft on transformers) are the oracles."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from llmos.errors import InvalidRequestError, ModelLoadError
from llmos.model.loader import save_model
from llmos.train.finetune import (
    adapter_state_dict, finalize_model, is_lora, load_adapter_state, load_base, merged_copy, prepare_model,
    save_adapter, trainable_parameters, unwrap,
)


@dataclass
class FTConfig:
    """The TrainConfig fields finetune reads (a local stand-in, so these tests do not depend on the trainer)."""

    init_from: str | None = None
    arch: str = "llama"
    seq_len: int = 32
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_merge: bool = True


pytestmark = pytest.mark.usefixtures("one_thread")


def ids_batch(vocab, seed=0, shape=(2, 24)):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def train_steps(model, vocab, steps=5, lr=1e-2):
    """A few AdamW steps of next-token prediction on random tokens (a tiny loop, not the trainer)."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        batch = ids_batch(vocab, seed=step, shape=(4, 17))
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_lora_model_trains_only_adapters_and_starts_equal_to_the_base(bases):
    config = FTConfig(init_from=str(bases["llama"]))
    model, mc, _ = load_base(config)
    ids = ids_batch(mc.vocab_size)
    with torch.no_grad():
        base_logits = model(ids)
    lora = prepare_model(config, model)
    assert is_lora(lora) and unwrap(lora) is model
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x (q, k, v, o): A [r, in] + B [out, r]
    h, kv = mc.hidden_size, mc.num_kv_heads * mc.head_dim
    per_layer = sum(4 * (i + o) for i, o in ((h, h), (h, kv), (h, kv), (h, h)))
    assert trainable_parameters(lora)[0] == mc.num_layers * per_layer
    with torch.no_grad():
        torch.testing.assert_close(lora(ids), base_logits, atol=0, rtol=0)  # B = 0 at the start


def test_optimizer_steps_change_only_adapters_and_merge_keeps_the_logits(bases):
    config = FTConfig(init_from=str(bases["llama"]))
    model, mc, _ = load_base(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = prepare_model(config, model)
    adapters_before = {k: v.clone() for k, v in adapter_state_dict(lora).items()}
    losses = train_steps(lora, mc.vocab_size)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    after = adapter_state_dict(lora)
    assert all(not torch.equal(adapters_before[k], after[k]) for k in after if ".lora_B." in k)
    for name, p in lora.named_parameters():  # every base weight bitwise unchanged
        if ".lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, before[key]), name
    ids = ids_batch(mc.vocab_size, seed=7)
    lora.eval()
    with torch.no_grad():
        unmerged = lora(ids)
        merged_model = finalize_model(config, lora)
        merged = merged_model(ids)
    assert not is_lora(merged_model) and type(merged_model).__name__ == "LlamaForCausalLM"
    assert not torch.allclose(merged, model_logits_of(bases["llama"], ids), atol=1e-4)  # it did learn something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def model_logits_of(path, ids):
    from llmos.model.loader import load_model

    with torch.no_grad():
        return load_model(path)[0](ids)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_merged_checkpoint_loads_in_transformers_with_the_same_logits(bases, family, tmp_path):
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    config = FTConfig(init_from=str(bases[family]), lora_targets=targets)
    model, mc, tokenizer = load_base(config)
    lora = prepare_model(config, model)
    train_steps(lora, mc.vocab_size, steps=3)
    ids = ids_batch(mc.vocab_size, seed=3)
    merged = finalize_model(config, lora)
    save_model(merged, mc, tmp_path / "ckpt", tokenizer=tokenizer)
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), theirs(ids).logits, atol=1e-4, rtol=0)
        base = T.AutoModelForCausalLM.from_pretrained(bases[family], attn_implementation="eager").eval()
        assert not torch.allclose(theirs(ids).logits, base(ids).logits, atol=1e-4)


def test_merged_checkpoint_runs_in_the_kernel_like_transformers_generate(bases, tmp_path):
    from llmos.kernel import syscalls
    from llmos.kernel.kernel import Kernel, KernelConfig
    from llmos.model.sampling import SamplingParams

    config = FTConfig(init_from=str(bases["llama"]), lora_rank=8, lora_targets=["q_proj", "v_proj", "up_proj"])
    model, mc, tokenizer = load_base(config)
    lora = prepare_model(config, model)
    train_steps(lora, mc.vocab_size, steps=4, lr=3e-2)
    save_model(finalize_model(config, lora), mc, tmp_path / "ckpt", tokenizer=tokenizer)
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    kernel = Kernel(str(tmp_path / "ckpt"), KernelConfig(kv_memory="16MiB", max_num_batched_tokens=128))
    for prompt in (tokenizer.encode("In the beginning"), [5, 17, 42, 99, 3]):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
        pid = syscalls.spawn(kernel, prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        assert syscalls.wait(kernel, pid).token_ids == ref


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_files_apply_with_peft_on_transformers(bases, family, tmp_path):
    """The unmerged LoRA forward equals peft's LoRA on transformers' model with our adapter files."""
    from peft import PeftModel

    config = FTConfig(init_from=str(bases[family]), lora_merge=False, lora_targets=["q_proj", "o_proj", "down_proj"])
    model, mc, _ = load_base(config)
    lora = prepare_model(config, model)
    train_steps(lora, mc.vocab_size, steps=3)
    lora.eval()
    ids = ids_batch(mc.vocab_size, seed=5)
    with torch.no_grad():
        ours = lora(ids)
    merged = finalize_model(config, lora, adapter_dir=tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["base_model_name_or_path"] == str(bases[family].absolute())
    base = T.AutoModelForCausalLM.from_pretrained(bases[family], attn_implementation="eager").eval()
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(ids), ours, atol=1e-5, rtol=0)


def test_checkpoints_during_training_and_resuming_a_lora_run(bases):
    """merged_copy leaves the LoRA model untouched; adapter tensors put into a fresh wrapper resume it exactly."""
    config = FTConfig(init_from=str(bases["llama"]))
    model, mc, _ = load_base(config)
    lora = prepare_model(config, model)
    train_steps(lora, mc.vocab_size, steps=3)
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    snapshot = merged_copy(lora)
    assert not is_lora(snapshot) and is_lora(lora)
    assert all(torch.equal(v, lora.state_dict()[k]) for k, v in state.items())
    ids = ids_batch(mc.vocab_size, seed=11)
    lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(snapshot(ids), lora(ids), atol=1e-5, rtol=0)
    fresh = prepare_model(config, load_base(config)[0])
    load_adapter_state(fresh, adapter_state_dict(lora))
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), lora(ids), atol=0, rtol=0)
    other = prepare_model(FTConfig(lora_rank=2), load_base(config)[0])
    with pytest.raises(ModelLoadError, match="does not fit this model"):
        load_adapter_state(other, adapter_state_dict(lora))


def test_full_fine_tuning_is_the_model_itself(bases):
    config = FTConfig(init_from=str(bases["llama"]), lora_rank=0)
    model, _, _ = load_base(config)
    assert prepare_model(config, model) is model
    assert all(p.requires_grad for p in model.parameters())
    assert finalize_model(config, model) is model


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_base_models_are_clear_errors(bases, tmp_path):
    with pytest.raises(InvalidRequestError, match="--init-from"):
        load_base(FTConfig(init_from=None))
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_base(FTConfig(init_from=str(tmp_path / "nope")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_base(FTConfig(init_from=str(tmp_path / "file")))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_base(FTConfig(init_from=str(tmp_path / "notes")))
    with pytest.raises(ModelLoadError, match="--arch gpt2 does not match.*llama checkpoint.*--arch llama"):
        load_base(FTConfig(init_from=str(bases["llama"]), arch="gpt2"))
    with pytest.raises(ModelLoadError, match="--arch lstm does not match"):
        load_base(FTConfig(init_from=str(bases["qwen2"])), arch="lstm")
    with pytest.raises(ModelLoadError, match="--arch llama does not match.*gpt2"):
        load_base(FTConfig(init_from=str(bases["gpt2"])), arch="llama")
    load_base(FTConfig(init_from=str(bases["gpt2"])))  # the default arch does not refuse another family
    load_base(FTConfig(init_from=str(bases["qwen2"])), arch="llama")  # qwen2 is of the llama family
    with pytest.raises(InvalidRequestError, match="--seq-len 65 is above the context.*64 tokens"):
        load_base(FTConfig(init_from=str(bases["llama"]), seq_len=65))


def test_bad_lora_settings_are_clear_errors(bases):
    model, _, _ = load_base(FTConfig(init_from=str(bases["llama"])))
    gpt2, _, _ = load_base(FTConfig(init_from=str(bases["gpt2"])))
    for bad, match in ((dict(lora_rank=-1), "--lora-rank"), (dict(lora_alpha=0), "--lora-alpha"),
                       (dict(lora_dropout=1.0), "--lora-dropout"), (dict(lora_targets=[]), "--lora-targets is empty"),
                       (dict(lora_targets=["q_proj", "c_attn"]), "c_attn: no such projection in a llama model")):
        with pytest.raises(InvalidRequestError, match=match):
            prepare_model(FTConfig(**bad), model)
    with pytest.raises(InvalidRequestError, match="wq: no such projection in a gpt2 model"):
        prepare_model(FTConfig(lora_targets=["wq"]), gpt2)
    with pytest.raises(InvalidRequestError, match="no LoRA adapters"):
        save_adapter(FTConfig(), model, "unused")
    assert not any(p for p in model.parameters() if not p.requires_grad)  # nothing was frozen by the failures
