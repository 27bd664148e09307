"""Next-token sampling: request parameters, the batched logits filters, per-row seeded draws, and stop strings.

Owns no model or scheduling state; every random draw comes from the generator of the row it is for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmos.errors import InvalidRequestError
from llmos.model import native


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    `max_tokens`: output tokens at most. `temperature`: logits divisor (0 = greedy). `top_k`: keep the
    k most likely tokens (0 = off). `top_p`: keep the smallest set with probability >= top_p.
    `min_p`: drop tokens below min_p x the top probability. `repetition_penalty`: > 1 discourages
    tokens already in the prompt or output. `seed`: makes the request's draws reproducible.
    `stop` / `stop_token_ids`: strings / ids that end the output. `ignore_eos`: keep going past EOS.
    `logprobs`: record each output token's log probability under the model (log-softmax of the raw
    logits, before any filter, as OpenAI's API and vLLM report it) and the `logprobs` most likely
    alternatives (0..20; None = do not record).
    Lists given for `stop` or `stop_token_ids` are stored as tuples.
    """

    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        for name in ("stop", "stop_token_ids"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax: temperature 0 or top_k 1."""
        return self.temperature == 0 or self.top_k == 1

    def validate(self) -> SamplingParams:
        """Check every field; return self.

        Raises `InvalidRequestError` naming the parameter, the bad value, the allowed range and the fix.
        """
        _check("max_tokens", self.max_tokens, _is_int(self.max_tokens) and self.max_tokens >= 1,
               "an integer >= 1", "ask for at least one token, e.g. max_tokens=128")
        _check("temperature", self.temperature, _is_finite(self.temperature) and self.temperature >= 0,
               "a finite number >= 0 (0 = greedy)", "use e.g. 0.7, or 0 for greedy decoding")
        _check("top_k", self.top_k, _is_int(self.top_k) and self.top_k >= 0,
               "an integer >= 0 (0 = off)", "use e.g. 50, or 0 to disable top-k")
        _check("top_p", self.top_p, _is_finite(self.top_p) and 0 < self.top_p <= 1,
               "in (0, 1]", "use e.g. 0.9, or 1.0 to disable top-p")
        _check("min_p", self.min_p, _is_finite(self.min_p) and 0 <= self.min_p <= 1,
               "in [0, 1]", "use e.g. 0.05, or 0 to disable min-p")
        _check("repetition_penalty", self.repetition_penalty,
               _is_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               "a finite number > 0 (1 = off)", "use e.g. 1.1, or 1.0 to disable it")
        _check("seed", self.seed, self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64),
               "an integer in [-2**63, 2**64) or None", "pass a whole number such as 1234, or leave it out")
        _check("stop", self.stop, isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
               "a tuple of non-empty strings", "e.g. stop=('\\n\\n',), without empty entries")
        _check("stop_token_ids", self.stop_token_ids,
               isinstance(self.stop_token_ids, tuple) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "a tuple of token ids >= 0", "pass integer token ids, e.g. stop_token_ids=(2,)")
        _check("logprobs", self.logprobs, self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
               "an integer from 0 to 20 or None", "ask for at most 20 alternatives, e.g. logprobs=5")
        return self


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(name: str, value, ok: bool, allowed: str, fix: str) -> None:
    if not ok:
        raise InvalidRequestError(f"invalid {name}={value!r}: must be {allowed}; {fix}.")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A `torch.Generator` on `device` seeded with `seed`, or None (use the caller's RNG) if no seed."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    """Picks one next token per row of a batch of logits.

    Filters, in order, each one vectorized over the batch with per-row parameter tensors:
    repetition penalty (CTRL, Keskar et al. 2019, as in transformers), temperature, top-k, top-p
    (nucleus, Holtzman et al. 2019), min-p (Nguyen et al. 2024). Greedy rows take the argmax; the
    other rows draw with the exponential race (argmax of probs / q, q ~ Exp(1), equivalent to
    Gumbel-max), the noise coming from the row's own generator, so a seeded request gets the same
    tokens whatever else is in the batch and in whatever order.
    """

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        histories: list[list[int]],
    ) -> torch.Tensor:
        """`logits` [batch, vocab] -> token ids LongTensor [batch].

        `generators[i]` is row i's RNG (None = torch's global RNG); `histories[i]` is row i's prompt +
        output ids, used by the repetition penalty.
        """
        batch = logits.shape[0]
        if not (len(params) == len(generators) == len(histories) == batch):
            raise ValueError(f"batch of {batch} logits rows needs as many params, generators and histories")
        if all(p.greedy and p.repetition_penalty == 1 for p in params):  # the common serving batch: argmax only
            return native.argmax_rows(logits.float())
        logits = apply_repetition_penalty(logits.float(), _column(params, "repetition_penalty", logits), histories)
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        tokens = logits.argmax(dim=-1)
        if greedy.all():
            return tokens
        probs = self.filtered_probs(logits, params)
        random_rows = (~greedy).nonzero().flatten().tolist()
        tokens[random_rows] = _exponential_race(probs[random_rows], [generators[i] for i in random_rows])
        return tokens

    @staticmethod
    def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p: `logits` [batch, vocab] -> probabilities [batch, vocab].

        Greedy rows are scaled as if temperature were 1 (their probabilities are not used)."""
        temperature = _column(params, "temperature", logits)
        logits = logits / torch.where(temperature > 0, temperature, 1.0).unsqueeze(1)
        logits = apply_top_k_top_p(logits, _column(params, "top_k", logits).long(), _column(params, "top_p", logits))
        logits = apply_min_p(logits, _column(params, "min_p", logits))
        return logits.softmax(dim=-1)


def _column(params: list[SamplingParams], name: str, like: torch.Tensor) -> torch.Tensor:
    """One parameter of every row as a float32 tensor [batch] on `like`'s device."""
    return torch.tensor([float(getattr(p, name)) for p in params], dtype=torch.float32, device=like.device)


def apply_repetition_penalty(logits: torch.Tensor, penalty: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019; transformers' `RepetitionPenaltyLogitsProcessor`):
    for tokens in row i's history, positive logits are divided by `penalty[i]`, negative ones multiplied.

    `logits` [batch, vocab], `penalty` [batch]; returns a new tensor."""
    if bool((penalty == 1).all()):
        return logits
    rows = torch.cat([torch.full((len(h),), i, dtype=torch.long) for i, h in enumerate(histories)])
    cols = torch.cat([torch.tensor(h, dtype=torch.long) for h in histories])  # one C-level conversion per row
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[rows.to(logits.device), cols.to(logits.device)] = True
    penalty = penalty.unsqueeze(1)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p (nucleus, Holtzman et al. 2019) with one sort; masked logits become -inf.

    `logits` [batch, vocab]; `top_k` [batch] (0 = off); `top_p` [batch] (1 = off). Ties with the k-th
    logit are kept and at least one token always survives, as in transformers' warpers."""
    use_k, use_p = bool((top_k > 0).any()), bool((top_p < 1).any())
    if not (use_k or use_p):
        return logits
    vocab = logits.shape[1]
    ascending, order = logits.sort(dim=-1)
    if use_k:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        kth_largest = ascending.gather(1, (vocab - k).unsqueeze(1))
        ascending = ascending.masked_fill(ascending < kth_largest, -math.inf)
    if use_p:
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False
        ascending = ascending.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, ascending)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024): drop tokens whose probability is below `min_p[i]` x row i's top
    probability. `logits` [batch, vocab], `min_p` [batch] (0 = off); the top token always survives."""
    if not bool((min_p > 0).any()):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, -math.inf)


def _exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Sample one token per row of `probs` [rows, vocab]: argmax(probs / q) with q ~ Exp(1) drawn
    from that row's generator, which picks token v with probability probs[v]."""
    q = torch.stack([torch.empty(probs.shape[1], device=probs.device).exponential_(generator=g) for g in generators])
    return (probs / q.clamp_min(torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index in `text` of the earliest occurrence of any stop string whose last character is at or
    after `start`, or -1. Pass `start` = length of the text before the newest delta: occurrences
    entirely before it were already checked, and one split across deltas is still found.

    The output is then truncated at the returned index (the stop string is not included)."""
    best = -1
    for stop in stops:
        if not stop:
            continue
        index = text.find(stop, max(0, start - len(stop) + 1))
        if index != -1 and (best == -1 or index < best):
            best = index
    return best


def logprob_entry(logprobs: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """`logprobs` [vocab] (a log-softmax row): the chosen token's log probability and the `k` most likely
    (token id, log probability) pairs, most likely first."""
    top = logprobs.topk(k) if k > 0 else None
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logprobs[token]), alternatives
