"""Decoder-only transformers: the Llama family (Llama 2/3, Qwen2, Mistral) and GPT-2.

Pure tensors in, tensors out. Parameter names mirror Hugging Face's so checkpoints map one to one.
Never knows about processes or scheduling: the runner hands it token rows, positions and a paged cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmos.model import native
from llmos.model.attention import AttentionMetadata, paged_attention
from llmos.model.config import ModelConfig, rope_inv_freq

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


class Linear(nn.Linear):
    """`nn.Linear` whose float32 CPU inference (no autograd) goes through `native.cpu_linear` (in the kernel with a
    packed copy of its weight: the panel kernel for decode-sized inputs, oneDNN's matmul for larger ones); float32
    CPU training through `native.training_linear` (oneDNN under autograd); other devices and dtypes `F.linear`."""

    # Set by the kernel (`CausalLM.warm_up`), whose weights never change after it starts. Elsewhere (training,
    # evaluation, merging adapters) weights may be changed through `.data`, which no version counter sees, so
    # a module that the kernel did not prepare always reads its live weight.
    packed: native.PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):  # compiled: inductor's own
            return native.cpu_linear(x, self.weight, self.bias, self.packed)
        y = native.training_linear(x, self.weight, self.bias)
        return super().forward(x) if y is None else y


class RMSNorm(nn.Module):
    """Root mean square layer norm (Zhang & Sennrich 2019), computed in fp32 as transformers does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021), half-split layout. `x` `[..., T, heads, head_dim]`, cos/sin `[..., T, 1, head_dim]`."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_proj_bias)
        self.scale = c.head_dim ** -0.5

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Dense causal attention. `x` `[B, T, hidden]`."""
        q, k, v = self.qkv(x, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(o.transpose(1, 2).flatten(2))

    def forward_paged(self, x, cos, sin, kv, meta: AttentionMetadata) -> torch.Tensor:
        """Paged attention. `x` `[N, hidden]`, `kv` = (k_cache, v_cache) of this layer."""
        q, k, v = self.qkv(x, cos, sin)
        o = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale)
        return self.o_proj(o.flatten(1))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020)."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, x, cos, sin, kv=None, meta=None):
        h = self.input_layernorm(x)
        h = self.self_attn(h, cos, sin) if meta is None else self.self_attn.forward_paged(h, cos, sin, kv, meta)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class CausalLM(nn.Module):
    """Common interface of llmos models.

    - `forward(input_ids [B, T]) -> logits [B, T, vocab]`: dense causal pass (training, oracle tests).
    - `hidden_states(input_ids [B, T]) -> hidden [B, T, hidden]`: the same pass without the LM head, for a loss
      that applies the head itself (`llmos.train.fast.linear_cross_entropy`).
    - `forward_paged(input_ids [N], positions [N], kv_caches, meta) -> hidden [N, hidden]`: the kernel's pass.
    - `compute_logits(hidden [M, hidden]) -> logits [M, vocab]` in fp32.
    """

    config: ModelConfig

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def cpu_linears(self) -> list[tuple[torch.Tensor, torch.Tensor | None, native.PackedWeight]]:
        """(weight, bias, packed copy) of every projection the float32 CPU inference path runs; in `forward_paged`
        order per layer, the LM head last."""
        out = []
        for module in self.modules():
            if isinstance(module, Linear):
                if module.packed is None:
                    module.packed = native.PackedWeight()
                out.append((module.weight, module.bias, module.packed))
        return out

    @torch.inference_mode()
    def warm_up(self, max_rows: int, max_logit_rows: int) -> None:
        """Prepare float32 CPU inference before the first request: pack every weight (`native.PackedWeight`) and
        build oneDNN's matmul primitive for every row count the kernel can send it (`native.bucket_rows` of
        1..`max_rows`, or past `native.PANEL_MAX_M` where the panel kernel takes the smaller ones; the LM head up
        to `max_logit_rows`), so that no step pays for them (0.2-2 ms each). Shapes repeat across
        layers, so the first layer's weights build them all. A no-op off the CPU, for other dtypes, or without
        oneDNN."""
        p = next(self.parameters())
        if p.device.type != "cpu" or p.dtype != torch.float32 or not native.onednn_linear_available():
            return
        linears = self.cpu_linears()
        for weight, _, packed in linears:
            packed.get(weight)
        head = self.lm_head.weight
        first = {}
        for weight, bias, packed in linears:
            key = (tuple(weight.shape), bias is not None, weight is head)
            first.setdefault(key, (weight, bias, packed))
        # Row counts the panel kernel takes build nothing (it has no primitives to build).
        smallest = native.PANEL_MAX_M + 1 if native.gemm_panels_available() else 1
        for (shape, _, is_head), (weight, bias, packed) in first.items():
            limit = max_logit_rows if is_head else max_rows
            for m in sorted({native.bucket_rows(m) for m in range(smallest, limit + 1)}):
                native.cpu_linear(weight.new_zeros(m, shape[1]), weight, bias, packed)


class LlamaForCausalLM(CausalLM):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.config = c
        self.model = LlamaBackbone(c)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", torch.tensor(rope_inv_freq(c), dtype=torch.float32), persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin `[*positions.shape, 1, head_dim]` for integer positions."""
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids))

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(torch.arange(input_ids.shape[1], device=input_ids.device), x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)

    def forward_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                      meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if fused_cpu_path(x, kv_caches):
            return self._forward_paged_fused(x, positions, kv_caches, meta)
        cos, sin = self.rope(positions, x.dtype)
        for layer, kv in zip(self.model.layers, kv_caches):
            x = layer(x, cos, sin, kv, meta)
        return self.model.norm(x)

    # ---- the fused float32 CPU path of forward_paged ----

    def fuse_projections(self) -> None:
        """Concatenate each layer's q/k/v and gate/up weights (and biases) into one tensor, and make the original
        parameters views of it: one matmul instead of three (two) per layer, no extra memory, and the state
        dict (names, shapes, values) unchanged. Idempotent."""
        if getattr(self, "_fused", False):
            return
        with torch.inference_mode(False), torch.no_grad():
            for layer in self.model.layers:
                a, m = layer.self_attn, layer.mlp
                a.qkv_weight, a.qkv_bias = _fuse([a.q_proj, a.k_proj, a.v_proj])
                m.gate_up_weight, m.gate_up_bias = _fuse([m.gate_proj, m.up_proj])
                a.qkv_packed, m.gate_up_packed = native.PackedWeight(), native.PackedWeight()
        self._fused = True

    def cpu_linears(self) -> list[tuple[torch.Tensor, torch.Tensor | None, native.PackedWeight]]:
        self.fuse_projections()
        out = []
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.o_proj, m.down_proj):
                if lin.packed is None:
                    lin.packed = native.PackedWeight()
            out += [(a.qkv_weight, a.qkv_bias, a.qkv_packed), (a.o_proj.weight, a.o_proj.bias, a.o_proj.packed),
                    (m.gate_up_weight, m.gate_up_bias, m.gate_up_packed),
                    (m.down_proj.weight, m.down_proj.bias, m.down_proj.packed)]
        if self.lm_head.packed is None:
            self.lm_head.packed = native.PackedWeight()
        return out + [(self.lm_head.weight, None, self.lm_head.packed)]

    def _forward_paged_fused(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                             meta: AttentionMetadata) -> torch.Tensor:
        """`forward_paged` in few calls per layer: fused projections (`fuse_projections`), and the native
        residual-add + RMSNorm, rotary + K/V write and SwiGLU kernels (`llmos.model.native`). Same math."""
        self.fuse_projections()
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        layers = self.model.layers
        h = native.add_rms_norm(x, None, layers[0].input_layernorm.weight, layers[0].input_layernorm.eps)
        for i, (layer, kv) in enumerate(zip(layers, kv_caches)):
            a, m = layer.self_attn, layer.mlp
            qkv = native.cpu_linear(h, a.qkv_weight, a.qkv_bias, a.qkv_packed)
            q, k, v = native.rope_write_kv(qkv, cos, sin, meta.slot_mapping, kv[0], kv[1], a.num_heads,
                                           a.num_kv_heads, a.head_dim)
            o = paged_attention(q, k, v, kv[0], kv[1], meta, a.scale, kv_written=True)
            o = a.o_proj(o.view(o.shape[0], -1))
            norm = layer.post_attention_layernorm
            h = native.add_rms_norm(x, o, norm.weight, norm.eps)
            gu = native.cpu_linear(h, m.gate_up_weight, m.gate_up_bias, m.gate_up_packed)
            d = m.down_proj(native.silu_mul(gu))
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            h = native.add_rms_norm(x, d, norm.weight, norm.eps)
        return h


def fused_cpu_path(x: torch.Tensor, kv_caches: KVCaches) -> bool:
    """Whether `forward_paged` can take the fused native path: float32 on the CPU, contiguous float32 caches,
    no autograd, and the native library built."""
    k = kv_caches[0][0] if kv_caches else None
    return (x.device.type == "cpu" and x.dtype == torch.float32 and k is not None and k.dtype == torch.float32
            and k.is_contiguous() and kv_caches[0][1].is_contiguous() and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and native.library() is not None)


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One `[sum(out), in]` weight (and bias) for `linears`; each linear's parameters become row views of it."""
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[row:row + n]
        if bias is not None:
            lin.bias.data = bias[row:row + n]
        row += n
    return weight, bias


# ---- GPT-2 ---------------------------------------------------------------------------------------


class GPT2Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.c_attn = Linear(c.hidden_size, 3 * c.hidden_size)
        self.c_proj = Linear(c.hidden_size, c.hidden_size)
        self.scale = c.head_dim ** -0.5

    def qkv(self, x):
        q, k, v = self.c_attn(x).split(self.num_heads * self.head_dim, dim=-1)
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        return q.view(shape), k.view(shape), v.view(shape)

    def forward(self, x):
        q, k, v = self.qkv(x)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           scale=self.scale)
        return self.c_proj(o.transpose(1, 2).flatten(2))

    def forward_paged(self, x, kv, meta):
        q, k, v = self.qkv(x)
        return self.c_proj(paged_attention(q, k, v, kv[0], kv[1], meta, self.scale).flatten(1))


class GPT2MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(c.hidden_size, c.intermediate_size)
        self.c_proj = Linear(c.intermediate_size, c.hidden_size)
        self.approximate = "none" if c.hidden_act == "gelu" else "tanh"

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class GPT2Block(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.attn = GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.mlp = GPT2MLP(c)

    def forward(self, x, kv=None, meta=None):
        h = self.ln_1(x)
        x = x + (self.attn(h) if meta is None else self.attn.forward_paged(h, kv, meta))
        return x + self.mlp(self.ln_2(x))


class GPT2Backbone(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.config = c
        self.transformer = GPT2Backbone(c)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids))

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def forward_paged(self, input_ids, positions, kv_caches: KVCaches, meta: AttentionMetadata) -> torch.Tensor:
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block, kv in zip(self.transformer.h, kv_caches):
            x = block(x, kv, meta)
        return self.transformer.ln_f(x)


def build_model(config: ModelConfig) -> nn.Module:
    """A randomly initialised model of `config`'s family (normal(0, 0.02) weights, as HF initialises; an
    "lstm" config gives `llmos.model.lstm.LSTMForCausalLM` with its own initialisation)."""
    if config.family == "lstm":
        from llmos.model.lstm import LSTMForCausalLM  # lstm.py imports this module

        model = LSTMForCausalLM(config)
        model.reset_parameters()
        return model
    model = GPT2LMHeadModel(config) if config.family == "gpt2" else LlamaForCausalLM(config)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    return model
