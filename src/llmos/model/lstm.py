"""The seed's recurrent language model: token embedding, multi-layer LSTM, linear head (`--arch lstm`).

Pure tensors in, tensors out. Never knows about processes or scheduling: the kernel's runner hands it
token rows and, for each sequence, the state slot that holds its (h, c) (see `StateSegment`), as it hands
the transformers token rows and a paged KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmos.model.config import ModelConfig
from llmos.model.transformer import Linear

RecurrentStates = list[tuple[torch.Tensor, torch.Tensor]]
"""The state slots, one `(h, c)` pair per LSTM layer, each `[num_slots, hidden]`: slot s of every layer
belongs to one sequence (the kernel's StatePool hands out views of its tensors)."""


@dataclass
class StateSegment:
    """One sequence's new tokens in the flat batch of a stateful step (a decode row or a prefill chunk).

    Rows `start : start + length` of the batch are its tokens, in order. `slot` is its state slot: the
    step starts from the (h, c) there, or from zeros when `fresh` (the sequence's first tokens; the slot's
    old content is never read), and leaves the state after its last token there.
    """

    start: int
    length: int
    slot: int
    fresh: bool = False


class LSTMForCausalLM(nn.Module):
    """Embedding -> dropout -> `num_layers`-layer LSTM (dropout between layers) -> dropout -> linear head.

    The word-level LSTM language model of Zaremba et al. 2014 ("Recurrent Neural Network Regularization")
    in the shape of PyTorch's `examples/word_language_model`: the embedding has `hidden_size` columns, so
    the head may share the embedding matrix (`tie_word_embeddings`, Press & Wolf 2017; Inan et al. 2017).
    Parameter names: `embed_tokens.weight` [vocab, hidden], `lstm.{weight_ih,weight_hh,bias_ih,bias_hh}_l{k}`
    ([4 * hidden, hidden] and [4 * hidden], gates i, f, g, o as in torch.nn.LSTM), `lm_head.weight`
    [vocab, hidden] (absent from checkpoints when tied) and `lm_head.bias` [vocab].

    - `forward(input_ids [B, T]) -> logits [B, T, vocab]`: the whole sequence from the zero state (training).
    - `forward_state(input_ids [N], segments, states) -> hidden [S, hidden]`: the kernel's stateful step.
    - `compute_logits(hidden [M, hidden]) -> logits [M, vocab]` in fp32.
    """

    is_recurrent = True

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        if c.family != "lstm":
            raise ValueError(f"LSTMForCausalLM needs an lstm config, got model_type {c.model_type!r}")
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.lstm = nn.LSTM(c.hidden_size, c.hidden_size, num_layers=c.num_layers, batch_first=True,
                            dropout=c.dropout if c.num_layers > 1 else 0.0)
        self.drop = nn.Dropout(c.dropout)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=True)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        """The word_language_model initialisation: embedding (and untied head) uniform(-0.1, 0.1), head bias
        0, LSTM weights and biases uniform(-1/sqrt(hidden), 1/sqrt(hidden)) (torch.nn.LSTM's own)."""
        nn.init.uniform_(self.embed_tokens.weight, -0.1, 0.1)
        if self.lm_head.weight is not self.embed_tokens.weight:
            nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
        nn.init.zeros_(self.lm_head.bias)
        self.lstm.reset_parameters()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`input_ids` [B, T] int64 -> logits [B, T, vocab], every sequence from the zero state."""
        x = self.drop(self.embed_tokens(input_ids))
        y, _ = self.lstm(x)
        return self.lm_head(self.drop(y))

    def forward_state(self, input_ids: torch.Tensor, segments: list[StateSegment],
                      states: RecurrentStates) -> torch.Tensor:
        """Run each segment's tokens from its slot's state, write the new state back, return the hidden
        state after each segment's last token, `[len(segments), hidden]`, in segment order (the LSTM's top
        layer output; `compute_logits` turns it into logits).

        `input_ids` [N] int64, the segments' rows concatenated; `states` per layer `(h, c)`, each
        `[num_slots, hidden]`, written in place. Segments of equal length run as one batched `nn.LSTM`
        call ([G, length] rows gathered by index), so a step makes one call per distinct chunk length: all
        decode rows (length 1) together, no Python loop over tokens. The slots of one call must be
        distinct (each sequence owns its slot while it is written; the block manager's copy-on-write sees
        to that). Raises ValueError when two segments share a slot.
        """
        slots_used = [s.slot for s in segments]
        if len(set(slots_used)) != len(slots_used):
            raise ValueError(f"forward_state: two segments write the same state slot ({slots_used})")
        dev = input_ids.device
        x = self.embed_tokens(input_ids)
        out = x.new_empty(len(segments), self.config.hidden_size)
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(segments):
            groups.setdefault(s.length, []).append(i)
        for length, members in groups.items():
            segs = [segments[i] for i in members]
            rows = torch.tensor([s.start for s in segs], device=dev)[:, None] + torch.arange(length, device=dev)
            slots = torch.tensor([s.slot for s in segs], dtype=torch.int64, device=dev)
            h0 = torch.stack([h.index_select(0, slots) for h, _ in states])  # [layers, G, hidden]
            c0 = torch.stack([c.index_select(0, slots) for _, c in states])
            if any(s.fresh for s in segs):
                fresh = torch.tensor([s.fresh for s in segs], device=dev)[None, :, None]
                h0, c0 = h0.masked_fill(fresh, 0), c0.masked_fill(fresh, 0)  # never read a fresh slot's old bytes
            y, (hn, cn) = self.lstm(x[rows], (h0.to(x.dtype), c0.to(x.dtype)))
            for layer, (h, c) in enumerate(states):
                h.index_copy_(0, slots, hn[layer].to(h.dtype))
                c.index_copy_(0, slots, cn[layer].to(c.dtype))
            out[torch.tensor(members, device=dev)] = y[:, -1]
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` [M, hidden] -> logits [M, vocab] in fp32."""
        return self.lm_head(hidden).float()
