"""llmos.model against transformers: prefill logits, paged decode step by step, greedy generations, round trips."""

import json
import os
import random

import pytest
import torch
import transformers as T

from llmos.errors import ModelLoadError, UnsupportedModelError
from llmos.model.attention import AttentionMetadata, Segment
from llmos.model.config import ModelConfig
from llmos.model.loader import load_model, save_model
from llmos.model.transformer import build_model

V = 160
SMALL = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": lambda: T.LlamaConfig(**SMALL, num_key_value_heads=2),
    "llama3-rope": lambda: T.LlamaConfig(**SMALL, num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128}),
    "llama-tied-bias": lambda: T.LlamaConfig(**SMALL, num_key_value_heads=4, tie_word_embeddings=True,
                                             attention_bias=True),
    "qwen2": lambda: T.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": lambda: T.MistralConfig(**SMALL, num_key_value_heads=1),
    "gpt2": lambda: T.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                 bos_token_id=1, eos_token_id=2),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(transformers model, llmos model, config) built from the same random checkpoint."""
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(FAMILIES[request.param]()).eval()
    if request.param == "qwen2":  # make the q/k/v biases non-zero so they are really tested
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.1)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    ours, config = load_model(d)
    return hf, ours, config


class PagedCache:
    """A minimal paged KV cache for tests: random, non-contiguous block ids per sequence."""

    def __init__(self, config: ModelConfig, num_blocks=64, block_size=4, seed=0, native_tables=True):
        self.bs, self.native_tables = block_size, native_tables
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}

    def slots(self, seq: int, start: int, n: int) -> list[int]:
        table = self.tables.setdefault(seq, [])
        while len(table) * self.bs < start + n:
            table.append(self.free.pop())
        return [table[p // self.bs] * self.bs + p % self.bs for p in range(start, start + n)]

    def step(self, model, decodes, prefills):
        """decodes: [(seq, token, pos)]; prefills: [(seq, tokens, start_pos)]. Returns last-row logits per entry."""
        ids, pos, slots, segs = [], [], [], []
        for seq, toks, p0 in [(seq, [tok], p) for seq, tok, p in decodes] + prefills:
            start = len(ids)
            ids += toks
            pos += range(p0, p0 + len(toks))
            slots += self.slots(seq, p0, len(toks))
            segs.append(Segment(start, len(toks), p0 + len(toks), torch.tensor(self.tables[seq])))
        meta = AttentionMetadata(torch.tensor(slots), segs)
        if self.native_tables:  # as the kernel's runner does on the CPU: the native attention kernel runs
            meta.with_row_tables(torch.tensor(pos))
        last = [seg.start + seg.length - 1 for seg in segs]
        with torch.no_grad():
            h = model.forward_paged(torch.tensor(ids), torch.tensor(pos), self.kv, meta)
            return model.compute_logits(h[last])


def test_prefill_logits_match(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, V, (3, 57), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("native_tables", [True, False], ids=["native-attention", "torch-attention"])
def test_paged_decode_matches_step_by_step(pair, native_tables):
    """Two sequences: chunked prefill (with prior context), then decode together, each step against HF."""
    hf, ours, config = pair
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, V, (23,), generator=g).tolist(), torch.randint(0, V, (9,), generator=g).tolist()
    cache = PagedCache(config, native_tables=native_tables)
    cache.step(ours, [], [(0, a[:10], 0)])  # first chunk of a
    out = cache.step(ours, [], [(0, a[10:], 10), (1, b, 0)])  # rest of a (attends over the cached chunk) + all of b
    with torch.no_grad():
        torch.testing.assert_close(out[0], hf(torch.tensor([a])).logits[0, -1], atol=1e-4, rtol=0)
        torch.testing.assert_close(out[1], hf(torch.tensor([b])).logits[0, -1], atol=1e-4, rtol=0)
    seqs = [a, b]
    for _ in range(12):
        toks = [int(o.argmax()) for o in out]
        decodes = []
        for i, t in enumerate(toks):
            seqs[i] = seqs[i] + [t]
            decodes.append((i, t, len(seqs[i]) - 1))
        out = cache.step(ours, decodes, [])
        with torch.no_grad():
            for i in range(2):
                ref = hf(torch.tensor([seqs[i]])).logits[0, -1]
                torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers(pair):
    hf, ours, config = pair
    prompt = torch.randint(3, V, (17,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    cache = PagedCache(config, num_blocks=32, block_size=16)
    out = cache.step(ours, [], [(0, prompt, 0)])
    got = []
    for _ in range(40):
        t = int(out[0].argmax())
        got.append(t)
        out = cache.step(ours, [(0, t, len(prompt) + len(got) - 1)], [])
    assert got == ref


def test_llmos_checkpoint_loads_in_transformers(pair, tmp_path):
    hf, ours, config = pair
    if hasattr(ours, "fuse_projections"):
        ours.fuse_projections()  # as a kernel leaves it: q/k/v and gate/up are views of fused weights
    save_model(ours, config, tmp_path / "ckpt")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, V, (2, 31), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_sharded_roundtrip_and_atomic_overwrite(tmp_path):
    config = ModelConfig(model_type="llama", vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                         intermediate_size=48, max_position_embeddings=64)
    model = build_model(config).eval()
    save_model(model, config, tmp_path / "m", max_shard_bytes=40_000)
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    back, _ = load_model(tmp_path / "m")
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids))
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=0)
    save_model(model, config, tmp_path / "m")  # overwrite in place: no temp dirs left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def good_dir(tmp_path):
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(FAMILIES["llama"]()).save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_unsupported_architecture(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="mamba"):
        load_model(good_dir)


def test_unsupported_rope_scaling(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_model(good_dir)


@pytest.mark.parametrize("option", [{"scale_attn_weights": False}, {"scale_attn_by_inverse_layer_idx": True}])
def test_gpt2_attention_scale_options_are_refused(tmp_path, option):
    """transformers honours these; llmos would silently compute other logits, so it refuses them."""
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, **option)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="attention scale"):
        load_model(tmp_path)


def test_truncated_safetensors(good_dir):
    f = good_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(good_dir)


def test_garbage_safetensors(good_dir):
    (good_dir / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(good_dir)


def test_shape_mismatch(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(good_dir)


def test_pickle_only_checkpoint_refused(good_dir):
    (good_dir / "model.safetensors").unlink()
    (good_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_model(good_dir)


def test_invalid_config_json(good_dir):
    (good_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(good_dir)


def test_num_parameters_matches_module():
    for make in FAMILIES.values():
        hf_cfg = make()
        config = ModelConfig.from_hf(hf_cfg.to_dict())
        model = build_model(config)
        assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_saved_checkpoint_is_readable_by_others(tmp_path):
    config = ModelConfig(model_type="llama", vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=48, max_position_embeddings=64)
    old = os.umask(0o022)
    try:
        path = save_model(build_model(config), config, tmp_path / "m")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert {f.stat().st_mode & 0o777 for f in path.iterdir()} == {0o644}
