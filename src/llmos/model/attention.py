"""Paged attention: write new K/V into the block pool by slot mapping, read it back through block tables.

Owns the attention math over a paged KV cache (CPU and CUDA share one API: gather + SDPA).
Knows nothing about processes: it sees only token rows, slots and block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmos.model import native


@dataclass
class Segment:
    """One sequence's new tokens in the flattened batch (a decode row or a prefill chunk).

    Rows `start : start + length` of the batch are its new tokens; after they are written the sequence
    has `context_len` tokens in the cache, the new ones last. `block_table` is `[num_blocks]` int64 and
    covers exactly `context_len` tokens.
    """

    start: int
    length: int
    context_len: int
    block_table: torch.Tensor


@dataclass
class AttentionMetadata:
    """Everything attention needs to find K/V, shared by all layers of one step.

    - `slot_mapping`: `[N]` int64, `block_id * block_size + offset` where each row's K/V is written.
    - `segments`: one `Segment` per sequence in the batch, in row order.
    - `num_decode`: the first `num_decode` segments are decode rows (one token each, rows 0..num_decode-1);
      `decode_tables` `[num_decode, max_blocks]` int64 (padded with 0) and `decode_lens` `[num_decode]`
      int64 describe them for the native kernel, built once per step by `with_decode_tables`.
    """

    slot_mapping: torch.Tensor
    segments: list[Segment] = field(default_factory=list)
    num_decode: int = 0
    decode_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None

    def with_decode_tables(self, tables: list[list[int]], lens: list[int]) -> AttentionMetadata:
        """Record the decode rows' block tables, padded into one tensor, for the native decode kernel."""
        if tables:
            width = max(len(t) for t in tables)
            self.decode_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
            self.decode_lens = torch.tensor(lens, dtype=torch.int64)
            self.num_decode = len(tables)
        return self


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values `[N, kv_heads, head_dim]` into caches `[num_blocks, block_size, kv_heads, head_dim]`."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, kv_written: bool = False
                    ) -> torch.Tensor:
    """Causal attention of new tokens over everything their sequence has in the paged cache.

    Args: `q` `[N, heads, head_dim]`, `k`/`v` `[N, kv_heads, head_dim]` (the new rows, already
    rotated), caches `[num_blocks, block_size, kv_heads, head_dim]`. Returns `[N, heads, head_dim]`.

    Writes the new K/V first (slot mapping), unless `kv_written` says the caller already has. Then each sequence gathers only its own blocks
    (`index_select` by its block table) and attends with SDPA (grouped-query attention via
    `enable_gqa`). A loop over sequences, not tokens or blocks: gathering one sequence at a time
    keeps the copy in cache, where one padded gather of the whole batch went through DRAM and was
    5x slower on CPU (measured, see docs/benchmarks.md). A chunk with nothing cached before it
    attends over its own new rows and reads no cache at all. On the CPU in float32, decode rows
    instead go to the native kernel (`llmos.model.native`), which reads the blocks in place.
    """
    if not kv_written:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    kv_shape = k_cache.shape[2:]
    segments = meta.segments
    if meta.num_decode and meta.decode_tables is not None and native.supports(q, k_cache):
        d = meta.num_decode
        out[:d] = native.paged_decode_attention(q[:d], k_cache, v_cache, meta.decode_tables, meta.decode_lens, scale)
        segments = segments[d:]
    for seg in segments:
        rows = slice(seg.start, seg.start + seg.length)
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, T, head_dim]
        if seg.context_len == seg.length:  # nothing cached before this chunk: attend over the new rows
            ks, vs = k[rows], v[rows]
            mask, causal = None, seg.length > 1
        else:
            ks = k_cache.index_select(0, seg.block_table).view(-1, *kv_shape)[: seg.context_len]
            vs = v_cache.index_select(0, seg.block_table).view(-1, *kv_shape)[: seg.context_len]
            mask, causal = None, False
            if seg.length > 1:  # a later prefill chunk: query i sees keys up to its own position
                q_pos = torch.arange(seg.context_len - seg.length, seg.context_len, device=q.device)
                mask = torch.arange(seg.context_len, device=q.device)[None, :] <= q_pos[:, None]
        ks = ks.transpose(0, 1).unsqueeze(0).to(q.dtype)
        vs = vs.transpose(0, 1).unsqueeze(0).to(q.dtype)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=gqa)
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out
