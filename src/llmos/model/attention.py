"""Paged attention: write new K/V into the block pool by slot mapping, read it back through block tables.

Owns the attention math over a paged KV cache (CPU and CUDA share one API: gather + SDPA).
Knows nothing about processes: it sees only token rows, slots and block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSegment:
    """One sequence's prefill chunk in the flattened batch.

    Rows `start : start + length` of the batch are its new tokens; after they are written the sequence
    has `context_len` tokens in the cache, the new ones last. `block_table` is `[num_blocks]` int64.
    """

    start: int
    length: int
    context_len: int
    block_table: torch.Tensor


@dataclass
class AttentionMetadata:
    """Everything attention needs to find K/V, shared by all layers of one step.

    The flattened batch holds `N` token rows: first `num_decode` decode rows (one per sequence),
    then the prefill chunks.

    - `slot_mapping`: `[N]` int64, `block_id * block_size + offset` where each row's K/V is written.
    - `decode_block_tables`: `[num_decode, max_blocks]` int64 (padded with 0).
    - `decode_mask`: `[num_decode, 1, 1, max_blocks * block_size]` bool, True where a key is valid.
    - `prefills`: one `PrefillSegment` per prefill chunk.
    """

    slot_mapping: torch.Tensor
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None
    prefills: list[PrefillSegment] = field(default_factory=list)

    @staticmethod
    def build(slot_mapping: torch.Tensor, decode_tables: list[list[int]], decode_context_lens: list[int],
              prefills: list[PrefillSegment], block_size: int, device: torch.device | str = "cpu") -> AttentionMetadata:
        """Pad the decode block tables and make the key mask once per step (not once per layer)."""
        meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode=len(decode_tables), prefills=prefills)
        if decode_tables:
            max_blocks = max(len(t) for t in decode_tables)
            tables = torch.zeros(len(decode_tables), max_blocks, dtype=torch.int64)
            for i, t in enumerate(decode_tables):
                tables[i, : len(t)] = torch.tensor(t, dtype=torch.int64)
            lens = torch.tensor(decode_context_lens, dtype=torch.int64)
            mask = torch.arange(max_blocks * block_size)[None, :] < lens[:, None]
            meta.decode_block_tables = tables.to(device)
            meta.decode_mask = mask[:, None, None, :].to(device)
        return meta


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values `[N, kv_heads, head_dim]` into caches `[num_blocks, block_size, kv_heads, head_dim]`."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of new tokens over everything their sequence has in the paged cache.

    Args: `q` `[N, heads, head_dim]`, `k`/`v` `[N, kv_heads, head_dim]` (the new rows, already
    rotated), caches `[num_blocks, block_size, kv_heads, head_dim]`. Returns `[N, heads, head_dim]`.
    Writes the new K/V first (slot mapping), then decode rows attend in one batched SDPA over
    their gathered blocks; each prefill chunk attends over its own context (grouped-query
    attention via SDPA's `enable_gqa`).
    """
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    d = meta.num_decode
    if d:
        tables = meta.decode_block_tables
        kd = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [D, kv_heads, L, head_dim]
        vd = v_cache[tables].flatten(1, 2).transpose(1, 2)
        qd = q[:d].unsqueeze(2)  # [D, heads, 1, head_dim]
        o = F.scaled_dot_product_attention(qd, kd.to(q.dtype), vd.to(q.dtype), attn_mask=meta.decode_mask,
                                           scale=scale, enable_gqa=gqa)
        out[:d] = o.squeeze(2)
    for seg in meta.prefills:
        rows = slice(seg.start, seg.start + seg.length)
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, T, head_dim]
        if seg.context_len == seg.length:  # nothing cached before this chunk: attend over the new rows
            ks, vs = k[rows], v[rows]
            mask, causal = None, True
        else:
            ks = k_cache[seg.block_table].flatten(0, 1)[: seg.context_len]
            vs = v_cache[seg.block_table].flatten(0, 1)[: seg.context_len]
            q_pos = torch.arange(seg.context_len - seg.length, seg.context_len, device=q.device)
            mask = torch.arange(seg.context_len, device=q.device)[None, :] <= q_pos[:, None]
            causal = False
        ks = ks.transpose(0, 1).unsqueeze(0).to(q.dtype)
        vs = vs.transpose(0, 1).unsqueeze(0).to(q.dtype)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=gqa)
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out
