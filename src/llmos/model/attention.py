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
    has `context_len` tokens in the cache, the new ones last. `table` is its block table, `[num_blocks]`
    int64 (a tensor, or a list made into one on first use of `block_table`), covering exactly `context_len`
    tokens.
    """

    start: int
    length: int
    context_len: int
    table: torch.Tensor | list[int]
    device: torch.device | str = "cpu"

    @property
    def block_table(self) -> torch.Tensor:
        if not isinstance(self.table, torch.Tensor):
            self.table = torch.tensor(self.table, dtype=torch.int64, device=self.device)
        return self.table


@dataclass
class AttentionMetadata:
    """Everything attention needs to find K/V, shared by all layers of one step.

    - `slot_mapping`: `[N]` int64, `block_id * block_size + offset` where each row's K/V is written.
    - `segments`: one `Segment` per sequence in the batch, in row order.
    - `tables` `[S, max_blocks]` int64 (the segments' block tables, padded with 0), `row_table` `[N]` (each
      row's segment) and `row_ctx` `[N]` (each row's position + 1): the same batch described per row for the
      native CPU kernel, built once per step by `with_row_tables` (None when not built).
    """

    slot_mapping: torch.Tensor
    segments: list[Segment] = field(default_factory=list)
    tables: torch.Tensor | None = None
    row_table: torch.Tensor | None = None
    row_ctx: torch.Tensor | None = None

    def with_row_tables(self, positions: torch.Tensor) -> AttentionMetadata:
        """Build `tables`, `row_table` and `row_ctx` from the segments and the rows' `positions` `[N]` int64."""
        tables = [seg.table.tolist() if isinstance(seg.table, torch.Tensor) else seg.table for seg in self.segments]
        width = max((len(t) for t in tables), default=0)
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
        row_table: list[int] = []
        for i, seg in enumerate(self.segments):
            row_table.extend([i] * seg.length)
        self.row_table = torch.tensor(row_table, dtype=torch.int64)
        self.row_ctx = positions + 1
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

    Writes the new K/V first (slot mapping), unless `kv_written` says the caller already has. Then each sequence
    gathers only its own blocks (`index_select` by its block table) and attends with SDPA (grouped-query
    attention via `enable_gqa`). A loop over sequences, not tokens or blocks: gathering one sequence at a time
    keeps the copy in cache, where one padded gather of the whole batch went through DRAM and was 5x slower on
    CPU (measured, see docs/benchmarks.md). A chunk with nothing cached before it attends over its own new rows
    and reads no cache at all. On the CPU in float32, with the per-row tables built (`with_row_tables`), every
    row instead goes to the native kernel (`llmos.model.native.paged_attention_rows`), which reads the blocks in
    place: one call per layer.
    """
    if not kv_written:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    if meta.row_table is not None and native.supports(q, k_cache):
        return native.paged_attention_rows(q, k_cache, v_cache, meta.tables, meta.row_table, meta.row_ctx, scale)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    kv_shape = k_cache.shape[2:]
    segments = meta.segments
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
