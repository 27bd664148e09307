"""The LSTM language model: its forward against a hand-written LSTM cell loop, the stateful step the kernel uses
against the full forward, the config and checkpoint round trips, and the errors for checkpoints that do not match."""

import json
import random

import pytest
import torch

from llmos.errors import ModelLoadError
from llmos.model.config import ModelConfig
from llmos.model.loader import load_model, save_model
from llmos.model.lstm import LSTMForCausalLM, StateSegment
from llmos.model.transformer import build_model


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**kw):
    kw = {"vocab_size": 61, "hidden_size": 32, "num_layers": 2, **kw}
    return ModelConfig(model_type="lstm", **kw)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(config(**kw)).eval()


def reference_logits(m: LSTMForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The oracle: the LSTM equations (Hochreiter & Schmidhuber 1997, with a forget gate; torch.nn.LSTM's gate
    order i, f, g, o) written out token by token in float64 from the state dict."""
    sd = {k: v.double() for k, v in m.state_dict().items()}
    L, H = m.config.num_layers, m.config.hidden_size
    out = []
    for row in ids.tolist():
        h = [torch.zeros(H, dtype=torch.float64) for _ in range(L)]
        c = [torch.zeros(H, dtype=torch.float64) for _ in range(L)]
        logits = []
        for t in row:
            x = sd["embed_tokens.weight"][t]
            for k in range(L):
                z = sd[f"lstm.weight_ih_l{k}"] @ x + sd[f"lstm.bias_ih_l{k}"] \
                    + sd[f"lstm.weight_hh_l{k}"] @ h[k] + sd[f"lstm.bias_hh_l{k}"]
                i, f, g, o = z.split(H)
                c[k] = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
                h[k] = torch.sigmoid(o) * torch.tanh(c[k])
                x = h[k]
            logits.append(sd["lm_head.weight"] @ x + sd["lm_head.bias"])
        out.append(torch.stack(logits))
    return torch.stack(out)


@pytest.mark.parametrize("tied,layers", [(False, 2), (True, 1), (True, 3)])
def test_forward_matches_a_hand_written_lstm(tied, layers):
    m = model(tie_word_embeddings=tied, num_layers=layers, dropout=0.2)
    if tied:
        assert m.lm_head.weight is m.embed_tokens.weight
    ids = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = m(ids)
    assert got.shape == (3, 11, 61)
    torch.testing.assert_close(got.double(), reference_logits(m, ids), atol=1e-5, rtol=0)


def test_trains_like_the_transformers():
    """The trainer's interface: build_model(config), model(input_ids) -> logits, a loss that goes down."""
    torch.manual_seed(0)
    m = build_model(config(dropout=0.1))
    assert m.training and isinstance(m, LSTMForCausalLM)
    data = torch.randint(0, 61, (4, 17))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-2)
    losses = []
    for _ in range(60):
        logits = m(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def run_stateful(m, sequences, schedule, num_slots):
    """Drive forward_state like the kernel: `schedule` is a list of steps, each a list of (sequence, n tokens);
    returns, per sequence, the hidden state after each step that ended at one of its tokens."""
    H, L = m.config.hidden_size, m.config.num_layers
    # Garbage in every slot: a fresh sequence must never read it.
    states = [(torch.full((num_slots, H), float("nan")), torch.full((num_slots, H), float("nan"))) for _ in range(L)]
    slot_of = {s: (7 * s + 3) % num_slots for s in range(len(sequences))}
    done = [0] * len(sequences)
    hidden = {s: {} for s in range(len(sequences))}
    for step in schedule:
        ids, segments = [], []
        for s, n in step:
            segments.append(StateSegment(len(ids), n, slot_of[s], fresh=done[s] == 0))
            ids += sequences[s][done[s]:done[s] + n]
        with torch.no_grad():
            out = m.forward_state(torch.tensor(ids), segments, states)
        for (s, n), h in zip(step, out):
            done[s] += n
            hidden[s][done[s] - 1] = h
    return hidden


def test_stateful_steps_equal_the_full_forward():
    """Chunked prefill of several sequences mixed with decodes of others, each from its own slot: the hidden
    state after every step and its logits equal the full forward at that position."""
    m = model(seed=3)
    rng = random.Random(0)
    sequences = [[rng.randrange(61) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    done, schedule = [0] * 6, []
    while any(d < len(s) for d, s in zip(done, sequences)):
        step = []
        for s, seq in enumerate(sequences):
            if done[s] < len(seq) and rng.random() < 0.7:
                n = 1 if done[s] > 3 and rng.random() < 0.5 else rng.randint(1, len(seq) - done[s])
                step.append((s, n))
                done[s] += n
        if step:
            schedule.append(step)
    assert any(len({n for _, n in step}) > 1 for step in schedule), "steps mix chunk lengths"
    hidden = run_stateful(m, sequences, schedule, num_slots=8)
    for s, seq in enumerate(sequences):
        with torch.no_grad():
            full = m(torch.tensor([seq]))[0]
        for pos, h in hidden[s].items():
            torch.testing.assert_close(m.compute_logits(h[None])[0], full[pos], atol=1e-5, rtol=0)


def test_decode_step_by_step_after_a_prefill_equals_the_full_forward():
    m = model(seed=4)
    seq = list(range(5, 45))
    schedule = [[(0, 13)], [(0, 7)]] + [[(0, 1)]] * 20
    hidden = run_stateful(m, [seq], schedule, num_slots=2)
    with torch.no_grad():
        full = m(torch.tensor([seq]))[0]
    assert sorted(hidden[0]) == [12, 19] + list(range(20, 40))
    for pos, h in hidden[0].items():
        torch.testing.assert_close(m.compute_logits(h[None])[0], full[pos], atol=1e-5, rtol=0)


def test_two_segments_may_not_write_one_slot():
    m = model()
    states = [(torch.zeros(2, 32), torch.zeros(2, 32)) for _ in range(2)]
    with pytest.raises(ValueError, match="same state slot"):
        m.forward_state(torch.tensor([1, 2]), [StateSegment(0, 1, 0, True), StateSegment(1, 1, 0, True)], states)


def test_config_round_trips_through_config_json():
    c = config(tie_word_embeddings=True, dropout=0.25, max_position_embeddings=512, bos_token_id=0,
               eos_token_ids=[1], num_heads=8, intermediate_size=999, rope_theta=5e5,
               norm_eps=1e-6)  # transformer fields mean nothing here
    hf = c.to_hf()
    assert hf["model_type"] == "llmos_lstm" and hf["architectures"] == ["LlmosLSTMForCausalLM"]
    assert ModelConfig.from_hf(json.loads(json.dumps(hf))) == c
    assert c.family == "lstm" and c.is_recurrent and c.context_length == 512
    assert config().context_length == 2048
    assert not ModelConfig(model_type="llama", vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
                           num_kv_heads=2, intermediate_size=16, max_position_embeddings=32).is_recurrent
    for tied in (False, True):
        m = model(tie_word_embeddings=tied)
        unique = {id(p): p for p in m.parameters()}.values()
        assert m.config.num_parameters() == sum(p.numel() for p in unique)


@pytest.mark.parametrize("bad,match", [({"dropout": 1.0}, "dropout"), ({"hidden_size": 0}, "hidden_size"),
                                       ({"num_layers": 0}, "num_layers")])
def test_config_errors(bad, match):
    with pytest.raises(ModelLoadError, match=match):
        config(**bad)


def test_save_load_round_trip(tmp_path):
    for tied in (False, True):
        m = model(seed=5, tie_word_embeddings=tied)
        path = save_model(m, m.config, tmp_path / f"lstm-{tied}")
        names = set(json.loads((path / "config.json").read_text()))
        assert {"model_type", "hidden_size", "num_hidden_layers", "vocab_size"} <= names
        loaded, c = load_model(path)
        assert isinstance(loaded, LSTMForCausalLM) and not loaded.training and c == m.config
        assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
        ids = torch.randint(0, 61, (2, 9))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids), m(ids), atol=0, rtol=0)


def test_mismatched_checkpoints_are_refused(tmp_path):
    m = model()
    path = save_model(m, m.config, tmp_path / "lstm")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48}))
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(path)
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="missing.*lstm.weight_ih_l2"):
        load_model(path)
    # A transformer's weights under an LSTM config (another architecture's checkpoint).
    llama = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    other = save_model(build_model(llama), llama, tmp_path / "llama")
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="different models"):
        load_model(other)
