"""Sampling filters against transformers' logits processors, seeded determinism, frequencies, validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmos.errors import InvalidRequestError
from llmos.model.sampling import Sampler, SamplingParams, apply_repetition_penalty, find_stop, make_generator

VOCAB = 50


def reference_probs(logits: torch.Tensor, params: SamplingParams, history: list[int]) -> torch.Tensor:
    """One row through transformers' processors, in llmos' order: [vocab] -> probabilities [vocab]."""
    scores = logits.unsqueeze(0).clone()
    ids = torch.tensor([history], dtype=torch.long)
    if params.repetition_penalty != 1:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    if params.temperature > 0:
        scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k > 0:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    scores = TopPLogitsWarper(params.top_p)(ids, scores)
    scores = MinPLogitsWarper(params.min_p)(ids, scores)
    return scores.softmax(dim=-1)[0]


def our_probs(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]]) -> torch.Tensor:
    penalty = torch.tensor([p.repetition_penalty for p in params])
    return Sampler.filtered_probs(apply_repetition_penalty(logits, penalty, histories), params)


random_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 3, 10, VOCAB + 5]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.8]),
)


@settings(max_examples=40, deadline=None)
@given(
    params=st.lists(random_params, min_size=1, max_size=4),
    histories=st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=12), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_filters_match_transformers_processors(params, histories, seed):
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    histories = histories[: len(params)]
    ours = our_probs(logits, params, histories)
    for row, (p, history) in enumerate(zip(params, histories)):
        torch.testing.assert_close(ours[row], reference_probs(logits[row], p, history), atol=1e-6, rtol=1e-5)


def test_repetition_penalty_matches_transformers_per_row():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    histories = [[1, 2, 2, 7], [], [49, 0, 3]]
    params = [SamplingParams(repetition_penalty=r) for r in (1.5, 2.0, 0.7)]
    ours = apply_repetition_penalty(logits, torch.tensor([p.repetition_penalty for p in params]), histories)
    for row in range(3):
        ids = torch.tensor([histories[row]], dtype=torch.long)
        expected = RepetitionPenaltyLogitsProcessor(params[row].repetition_penalty)(ids, logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row], expected[0])


def test_greedy_rows_take_argmax_after_penalty():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1), dtype=torch.float32).bfloat16()
    top = logits.float().argmax(dim=-1)
    histories = [[int(top[0])], [], [], []]
    params = [
        SamplingParams(temperature=0, repetition_penalty=1e6),
        SamplingParams(temperature=0),
        SamplingParams(top_k=1, temperature=5.0),
        SamplingParams(temperature=1.0, seed=3),
    ]
    assert params[0].greedy and params[2].greedy and not params[3].greedy
    tokens = Sampler().sample(logits, params, [None, None, None, make_generator(3, "cpu")], histories)
    assert tokens.dtype == torch.long and tokens.shape == (4,)
    assert int(tokens[0]) != int(top[0])  # the penalty pushed the repeated argmax down
    assert int(tokens[0]) == int(logits[0].float().index_fill(0, top[0], -math.inf).argmax())
    assert tokens[1:3].tolist() == top[1:3].tolist()


def run_steps(logits_row, params, position, others, steps=15):
    """Tokens a seeded request draws over `steps` calls when placed at `position` among `others`."""
    batch_params = others[:position] + [params] + others[position:]
    generators = [make_generator(p.seed, "cpu") if p.seed is not None else None for p in batch_params]
    logits = torch.randn(len(batch_params), VOCAB, generator=torch.Generator().manual_seed(99))
    logits[position] = logits_row
    drawn = []
    for _ in range(steps):
        tokens = Sampler().sample(logits, batch_params, generators, [[] for _ in batch_params])
        drawn.append(int(tokens[position]))
    return drawn


def test_same_seed_same_tokens_whatever_the_batch():
    logits_row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5))
    request = SamplingParams(temperature=1.2, top_p=0.9, seed=1234)
    alone = run_steps(logits_row, request, 0, [])
    others = [SamplingParams(seed=1), SamplingParams(temperature=0), SamplingParams(top_k=5), SamplingParams(seed=9)]
    torch.manual_seed(0)
    assert run_steps(logits_row, request, 2, others) == alone
    torch.manual_seed(1)
    assert run_steps(logits_row, request, 4, others[::-1]) == alone
    assert len(set(alone)) > 1  # it really sampled
    assert run_steps(logits_row, SamplingParams(temperature=1.2, top_p=0.9, seed=4321), 0, []) != alone


def test_unseeded_rows_use_the_global_rng():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(), SamplingParams()]
    torch.manual_seed(7)
    first = Sampler().sample(logits, params, [None, None], [[], []])
    torch.manual_seed(7)
    assert torch.equal(Sampler().sample(logits, params, [None, None], [[], []]), first)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(top_k=3), SamplingParams(top_p=0.7)],
)
def test_frequencies_match_filtered_softmax(params):
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    draws = 3000
    logits = probs.log().expand(draws, -1).contiguous()
    generator = make_generator(0, "cpu")
    tokens = Sampler().sample(logits, [params] * draws, [generator] * draws, [[]] * draws)
    expected = our_probs(probs.log().unsqueeze(0), [params], [[]])[0]
    torch.testing.assert_close(expected, reference_probs(probs.log(), params, []), atol=1e-6, rtol=1e-5)
    counts = torch.bincount(tokens, minlength=len(probs)).float()
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    kept = expected > 0
    chi2 = ((counts[kept] - draws * expected[kept]) ** 2 / (draws * expected[kept])).sum()
    assert chi2 < 20.5  # chi-square 99.9th percentile for 5 degrees of freedom


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(42, "cpu"), make_generator(42, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# ---- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan),
        ("top_p", 0.0), ("top_p", 1.01), ("top_p", -1.0),
        ("top_k", -1), ("top_k", 2.5),
        ("min_p", -0.01), ("min_p", 1.5),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
        ("max_tokens", 0), ("max_tokens", -5),
        ("stop", ("ok", 3)), ("stop", ("",)), ("stop", "###"),
        ("stop_token_ids", (-1,)),
        ("seed", 1.5), ("seed", "42"), ("seed", True),
    ],
)
def test_validation_errors_name_parameter_value_range_and_fix(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(InvalidRequestError) as err:
        params.validate()
    message = str(err.value)
    assert f"{field}={value!r}" in message and "must be" in message and ";" in message


@settings(max_examples=50, deadline=None)
@given(params=random_params, seed=st.none() | st.integers(0, 2**63 - 1), stop=st.lists(st.text(min_size=1), max_size=3))
def test_valid_params_pass(params, seed, stop):
    params = SamplingParams(**{**params.__dict__, "seed": seed, "stop": stop})
    assert params.validate() is params
    assert isinstance(params.stop, tuple)


# ---- stop strings ---------------------------------------------------------------------------------


def test_find_stop_examples():
    assert find_stop("hello world", ["wor"]) == 6
    assert find_stop("hello world", ["xyz"]) == -1
    assert find_stop("a STOP b END", ["END", "STOP"]) == 2
    assert find_stop("abc STOP", ["STOP"], start=6) == 4  # "ST" came in an earlier delta, "OP" in this one
    assert find_stop("STOP then more", ["STOP"], start=5) == -1  # already checked in an earlier delta
    assert find_stop("", ["x"]) == -1


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=20),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
    start=st.integers(0, 22),
)
def test_find_stop_matches_brute_force(text, stops, start):
    hits = [i for i in range(len(text)) for s in stops if text.startswith(s, i) and i + len(s) - 1 >= start]
    assert find_stop(text, stops, start) == (min(hits) if hits else -1)


def test_seed_outside_torch_range_is_refused():
    import pytest as _pytest
    from llmos.errors import InvalidRequestError as _E
    from llmos.model.sampling import SamplingParams as _P
    with _pytest.raises(_E, match="seed"):
        _P(seed=2**64).validate()
    _P(seed=2**64 - 1).validate()
