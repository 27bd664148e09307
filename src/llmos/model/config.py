"""One config class for every supported family, converted from and to Hugging Face `config.json`.

Owns the mapping between HF field names and ours and rejects what llmos cannot run. Never touches tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmos.errors import ModelLoadError, UnsupportedModelError

LLAMA_LIKE = ("llama", "qwen2", "mistral")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "gpt2", "lstm")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "lstm": "LlmosLSTMForCausalLM",
}
# config.json's model_type where it differs from ours: the LSTM is llmos's own, not a transformers architecture.
HF_MODEL_TYPES = {"lstm": "llmos_lstm"}
FROM_HF_MODEL_TYPES = {v: k for k, v in HF_MODEL_TYPES.items()}
LSTM_DEFAULT_CONTEXT = 2048


@dataclass
class ModelConfig:
    """Shape and options of a decoder-only language model.

    `family` is "llama" (Llama 2/3, Qwen2/2.5, Mistral, SmolLM, TinyLlama: RoPE, RMSNorm, SwiGLU,
    grouped-query attention), "gpt2" (learned positions, LayerNorm, GELU MLP, fused QKV) or "lstm"
    (llmos's recurrent language model: embedding, multi-layer LSTM, linear head; see model/lstm.py).

    The transformers need every shape field. An LSTM needs only `vocab_size`, `hidden_size` (the
    embedding and LSTM width) and `num_layers`; `dropout` (training only), `tie_word_embeddings`,
    bos/eos ids and `max_position_embeddings` (the context the kernel serves, default 2048) are
    optional, and the transformer fields are fixed whatever is passed (one "head" of width hidden_size,
    no RoPE scaling, no biases, hidden_act "tanh") so that a config survives `to_hf` / `from_hf` unchanged.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int = 0  # required for transformers
    num_kv_heads: int = 0  # required for transformers
    intermediate_size: int = 0  # required for transformers
    max_position_embeddings: int = 0  # required for transformers; LSTM: 0 means LSTM_DEFAULT_CONTEXT
    head_dim: int = 0  # 0: hidden_size // num_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama's attention_bias)
    o_proj_bias: bool = False  # bias on the output projection (Llama's attention_bias)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"
    dropout: float = 0.0  # LSTM only: dropout on the embeddings, between LSTM layers and before the head (training)

    def __post_init__(self) -> None:
        if self.model_type == "lstm":
            self._normalize_lstm()
        if self.head_dim == 0 and isinstance(self.num_heads, int) and self.num_heads > 0:
            self.head_dim = self.hidden_size // self.num_heads
        self.validate()

    def _normalize_lstm(self) -> None:
        """Fix the fields an LSTM does not have, so equal LSTMs have equal configs."""
        if isinstance(self.hidden_size, int) and self.hidden_size > 0:
            self.num_heads = self.num_kv_heads = 1
            self.head_dim = self.intermediate_size = self.hidden_size
        if not self.max_position_embeddings:
            self.max_position_embeddings = LSTM_DEFAULT_CONTEXT
        self.rope_scaling, self.sliding_window = None, None
        self.attention_bias = self.o_proj_bias = self.mlp_bias = False
        self.norm_eps, self.rope_theta, self.hidden_act = 1e-5, 10000.0, "tanh"

    @property
    def family(self) -> str:
        if self.model_type in ("gpt2", "lstm"):
            return self.model_type
        return "llama"

    @property
    def is_recurrent(self) -> bool:
        """True for a model whose per-sequence memory is a fixed-size recurrent state (the LSTM), not K/V."""
        return self.model_type == "lstm"

    @property
    def context_length(self) -> int:
        """Longest sequence (prompt + output tokens) the model may attend over."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def validate(self) -> None:
        """Raise `UnsupportedModelError` / `ModelLoadError` for configs llmos cannot run."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; llmos runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints. Convert the model or pick a supported one."
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ModelLoadError(f"config.json: {name} must be a positive integer, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})."
            )
        if self.family == "lstm" and (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                                      or not 0 <= self.dropout < 1):
            raise ModelLoadError(f"config.json: dropout must be a number in [0, 1), got {self.dropout!r}.")
        if self.family == "llama" and self.hidden_act != "silu":
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported for {self.model_type}; only 'silu'.")
        if self.family == "gpt2" and self.hidden_act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"activation_function {self.hidden_act!r} is not supported for gpt2.")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {rope_type!r} is not supported; llmos supports {', '.join(SUPPORTED_ROPE_TYPES)}."
            )

    # ---- Hugging Face conversion -------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF `config.json` (transformers 4.x and 5.x layouts; llmos's own "llmos_lstm")."""
        hf_type = d.get("model_type")
        model_type = FROM_HF_MODEL_TYPES.get(hf_type, hf_type) if isinstance(hf_type, str) else hf_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures") or []
            names = [HF_MODEL_TYPES.get(t, t) for t in SUPPORTED_MODEL_TYPES]
            raise UnsupportedModelError(
                f"config.json: model_type {hf_type!r} (architectures {archs}) is not supported; llmos runs "
                f"{', '.join(names)} checkpoints."
            )
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        try:
            if model_type == "lstm":
                return cls(
                    model_type="lstm", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                    num_layers=d["num_hidden_layers"], max_position_embeddings=d.get("max_position_embeddings", 0),
                    dropout=d.get("dropout", 0.0), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                    bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids, torch_dtype=str(dtype),
                )
            if model_type == "gpt2":
                if not d.get("scale_attn_weights", True) or d.get("scale_attn_by_inverse_layer_idx", False):
                    raise UnsupportedModelError(
                        "this gpt2 config changes the attention scale (scale_attn_weights false or "
                        "scale_attn_by_inverse_layer_idx true), which llmos does not support; it runs GPT-2 models "
                        "with the standard 1/sqrt(head_dim) scale.")
                hidden = d["n_embd"]
                return cls(
                    model_type="gpt2", vocab_size=d["vocab_size"], hidden_size=hidden,
                    num_layers=d["n_layer"], num_heads=d["n_head"], num_kv_heads=d["n_head"],
                    intermediate_size=d.get("n_inner") or 4 * hidden,
                    max_position_embeddings=d.get("n_positions", 1024),
                    norm_eps=d.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True,
                    attention_bias=True, o_proj_bias=True, mlp_bias=True,
                    hidden_act=d.get("activation_function", "gelu_new"),
                    bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids, torch_dtype=str(dtype),
                )
            rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
            if "type" in rope and "rope_type" not in rope:
                rope["rope_type"] = rope.pop("type")
            rope_theta = rope.pop("rope_theta", None) or d.get("rope_theta", 10000.0)
            if rope.get("rope_type", "default") == "default":
                rope = {}
            sliding = None
            if model_type == "mistral" or (model_type == "qwen2" and d.get("use_sliding_window")):
                sliding = d.get("sliding_window")
            llama_bias = bool(d.get("attention_bias", False)) if model_type == "llama" else False
            return cls(
                model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                intermediate_size=d["intermediate_size"],
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                head_dim=d.get("head_dim") or 0, norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope_theta), rope_scaling=rope or None,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=(model_type == "qwen2") or llama_bias, o_proj_bias=llama_bias,
                mlp_bias=bool(d.get("mlp_bias", False)), hidden_act=d.get("hidden_act", "silu"),
                sliding_window=sliding, bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids,
                torch_dtype=str(dtype),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json is missing the field {e.args[0]!r} required for {model_type}.") from None
        except TypeError as e:
            raise ModelLoadError(f"config.json has a field of the wrong type: {e}.") from None

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict that `transformers.AutoConfig` reads back to the same model."""
        eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else (self.eos_token_ids or None)
        common = {"architectures": [HF_ARCHITECTURES[self.model_type]],
                  "model_type": HF_MODEL_TYPES.get(self.model_type, self.model_type),
                  "vocab_size": self.vocab_size, "bos_token_id": self.bos_token_id, "eos_token_id": eos,
                  "torch_dtype": self.torch_dtype, "tie_word_embeddings": self.tie_word_embeddings}
        if self.family == "lstm":
            return {**common, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                    "max_position_embeddings": self.max_position_embeddings, "dropout": self.dropout}
        if self.family == "gpt2":
            return {**common, "n_embd": self.hidden_size, "n_layer": self.num_layers, "n_head": self.num_heads,
                    "n_inner": self.intermediate_size, "n_positions": self.max_position_embeddings,
                    "layer_norm_epsilon": self.norm_eps, "activation_function": self.hidden_act}
        d = {**common, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
             "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
             "head_dim": self.head_dim, "intermediate_size": self.intermediate_size,
             "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.norm_eps,
             "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "hidden_act": self.hidden_act}
        if self.model_type == "llama":
            d["attention_bias"] = self.o_proj_bias
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
        if self.model_type in ("mistral", "qwen2"):
            d["sliding_window"] = self.sliding_window
        return d

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read `path/config.json`. Raises `ModelLoadError` if missing or not valid JSON."""
        f = Path(path) / "config.json"
        if not f.is_file():
            raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face checkpoint directory; "
                                 "use the directory that holds config.json and the safetensors weights.")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{f} is not valid JSON ({e}); restore it from the original checkpoint.") from None
        if not isinstance(d, dict):
            raise ModelLoadError(f"{f} must hold a JSON object.")
        return cls.from_hf(d)

    def num_parameters(self) -> int:
        """Parameter count implied by the shape (tied embeddings counted once)."""
        h, i, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        if self.family == "lstm":  # embedding, per layer W_ih [4h, h] + W_hh [4h, h] + two biases [4h], head (+ bias)
            return v * h + L * (8 * h * h + 8 * h) + (0 if self.tie_word_embeddings else v * h) + v
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.family == "gpt2":
            per_layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
            return v * h + self.max_position_embeddings * h + L * per_layer + 2 * h
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0) + (h if self.o_proj_bias else 0)
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + head + L * (attn + mlp + 2 * h) + h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rope_inv_freq(config: ModelConfig) -> list[float]:
    """Inverse frequencies of rotary embeddings, `[head_dim // 2]`.

    RoPE (Su et al. 2021); "linear" position interpolation (Chen et al. 2023); "llama3" frequency-dependent
    scaling as in Meta's Llama 3.1 reference code and transformers' `_compute_llama3_parameters`.
    """
    dim = config.head_dim
    inv = [1.0 / (config.rope_theta ** (2 * j / dim)) for j in range(dim // 2)]
    rs = config.rope_scaling or {}
    kind = rs.get("rope_type", "default")
    if kind == "linear":
        return [f / rs["factor"] for f in inv]
    if kind == "llama3":
        factor, low, high = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_ctx = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out
    return inv
