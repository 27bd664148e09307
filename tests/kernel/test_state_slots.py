"""The kernel serving the LSTM: its per-process (h, c) state lives in one state slot that the block manager
allocates, frees, shares on fork (copy-on-write), swaps, suspends and hibernates like KV blocks. The oracle is a
brute-force loop over the model's full forward (the whole sequence from the zero state every token) with the
kernel's sampler and seed rule; block accounting is checked after every step."""

import random
import shutil
from dataclasses import fields

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from llmos.cli import main as cli
from llmos.errors import HibernationError, InvalidRequestError
from llmos.kernel import syscalls
from llmos.kernel.hibernate import HibernationImage, HibernationStore, save_image
from llmos.kernel.kernel import Kernel, KernelConfig
from llmos.kernel.kvcache import StatePool
from llmos.kernel.proc import ProcState
from llmos.model.config import ModelConfig
from llmos.model.loader import load_model, save_model
from llmos.model.sampling import Sampler, SamplingParams, make_generator
from llmos.model.transformer import build_model

GREEDY = dict(temperature=0, ignore_eos=True)
LAYERS, HIDDEN, CONTEXT = 2, 32, 160
SLOT = StatePool.bytes_per_slot(LAYERS, HIDDEN, torch.float32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lstm_dir(tiny_model_dir, tmp_path_factory):
    """A random 2-layer LSTM checkpoint written by save_model, with the tiny models' 300-token tokenizer."""
    config = ModelConfig(model_type="lstm", vocab_size=300, hidden_size=HIDDEN, num_layers=LAYERS,
                         max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_ids=[0])
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():  # larger weights than the training init: well separated logits, so greedy is stable
        for p in model.parameters():
            nn.init.normal_(p, std=0.4)
    path = save_model(model, config, tmp_path_factory.mktemp("lstm") / "tiny-lstm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def model(lstm_dir):
    return load_model(lstm_dir)[0]


def make(lstm_dir, tmp_path, slots=64, swap_slots=64, **kw):
    kw.setdefault("max_num_batched_tokens", 64)
    return Kernel(lstm_dir, KernelConfig(kv_memory=slots * SLOT, swap_memory=swap_slots * SLOT,
                                         hibernate_dir=str(tmp_path), **kw))


def brute_force(model, prompt, params):
    """The oracle: each token from the full forward over prompt + output so far, sampled with the kernel's
    Sampler and a generator seeded like the kernel's (make_generator(seed))."""
    g, sampler, tokens = make_generator(params.seed), Sampler(), list(prompt)
    with torch.no_grad():
        for _ in range(params.max_tokens):
            logits = model(torch.tensor([tokens]))[0, -1:].float()
            tokens.append(sampler.sample(logits, [params], [g], [tokens]).item())
    return tokens[len(prompt):]


def ids(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(1, 300) for _ in range(n)]


def check(k: Kernel):
    """Accounting after a step: the block manager's invariants, one slot per process that holds memory, and
    no slot (device or swap) for an ended or waiting-without-state process."""
    bm = k.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    for p in k.processes.values():
        held = bm.num_resident_blocks(p.pid) + bm.num_swapped_blocks(p.pid)
        assert held <= 1, f"{p} holds {held} slots"
        if p.is_finished:
            assert held == 0, f"{p} ended but holds a slot"
        elif p.state is ProcState.RUNNING:
            assert bm.num_resident_blocks(p.pid) == 1
        elif held == 0:
            assert p.num_computed_tokens == 0, f"{p} has computed tokens but no state"


def run(k: Kernel, specs):
    pids = [k.spawn(prompt, params).pid for prompt, params in specs]
    while k.has_work():
        k.step()
        check(k)
    return [k.processes[pid].output_token_ids for pid in pids]


SPECS = [(ids(n, seed=n), SamplingParams(max_tokens=m, **GREEDY)) for n, m in ((5, 20), (37, 12), (1, 25))] + [
    (ids(n, seed=100 + n), SamplingParams(max_tokens=m, temperature=0.9, seed=n, ignore_eos=True))
    for n, m in ((12, 18), (70, 10), (3, 22), (25, 15), (9, 20))]


@pytest.fixture(scope="module")
def expected(model):
    return [brute_force(model, prompt, params) for prompt, params in SPECS]


def test_state_slots_map_onto_the_block_manager(lstm_dir, tmp_path):
    k = make(lstm_dir, tmp_path, slots=5, max_num_seqs=8)
    bm = k.block_manager
    assert isinstance(k.pool, StatePool) and k.pool.nbytes == 5 * SLOT
    assert bm.num_blocks == 5 and bm.block_size == CONTEXT and not bm.enable_prefix_cache
    assert make(lstm_dir, tmp_path, slots=100, max_num_seqs=3).block_manager.num_blocks == 3, "capped at the seats"
    p = k.spawn(ids(50, 1), SamplingParams(max_tokens=100, **GREEDY))  # 150 tokens: still one slot
    for _ in range(5):
        k.step()
        check(k)
        assert bm.num_used_blocks == 1
    row = k.ps()[0]
    assert row["resident_blocks"] == 1 and row["kv_bytes"] == SLOT
    assert k.memory()["bytes_per_block"] == SLOT
    k.kill(p.pid)
    check(k)
    assert bm.num_used_blocks == 0
    with pytest.raises(InvalidRequestError, match="context window"):
        k.spawn(ids(CONTEXT, 2))
    with pytest.raises(InvalidRequestError, match="state slot"):
        make(lstm_dir, tmp_path, slots=0.5)


def test_greedy_generation_equals_the_full_forward_loop(lstm_dir, tmp_path, model, expected):
    k = make(lstm_dir, tmp_path)
    for (prompt, params), want in zip(SPECS, expected):
        assert syscalls.wait(k, syscalls.spawn(k, prompt, params)).token_ids == want
    # A generation that reaches the context length stops there.
    p = k.spawn(ids(CONTEXT - 5, 3), SamplingParams(max_tokens=50, **GREEDY))
    k.run_until_done()
    assert p.finish_reason == "length" and p.num_tokens == CONTEXT
    assert p.output_token_ids == brute_force(model, p.prompt_token_ids, SamplingParams(max_tokens=5, **GREEDY))


def test_same_tokens_alone_in_a_batch_of_eight_and_in_chunks(lstm_dir, tmp_path, expected):
    k = make(lstm_dir, tmp_path)
    assert run(k, SPECS) == expected
    chunked = make(lstm_dir, tmp_path, max_num_batched_tokens=7)  # prefill in chunks beside decodes
    assert run(chunked, SPECS) == expected


@pytest.mark.parametrize("swap_slots", [0, 8])
def test_same_tokens_after_preemption_by_recompute_and_by_swap(lstm_dir, tmp_path, expected, swap_slots):
    # One slot covers a process whatever its length, so a running process never runs short of blocks: with 3
    # slots for 8 processes, round robin (a quantum of 3 decode tokens) is what preempts.
    k = make(lstm_dir, tmp_path, slots=3, swap_slots=swap_slots, max_num_seqs=8, rr_quantum=3)
    pids = [k.spawn(prompt, params).pid for prompt, params in SPECS]
    swapped = 0
    while k.has_work():
        k.step()
        check(k)
        swapped = max(swapped, sum(k.block_manager.is_swapped(pid) for pid in pids))
    assert sum(k.processes[pid].num_preemptions for pid in pids) > 0
    assert (swapped > 0) == (swap_slots > 0), "swap when there is swap space, recompute when there is none"
    assert [k.processes[pid].output_token_ids for pid in pids] == expected
    assert k.block_manager.num_used_blocks == 0 and k.block_manager.num_free_swap_blocks == swap_slots


@pytest.mark.parametrize("swap_slots", [0, 4])
def test_same_tokens_after_suspend_and_resume(lstm_dir, tmp_path, expected, swap_slots):
    k = make(lstm_dir, tmp_path, swap_slots=swap_slots)
    prompt, params = SPECS[4]
    p = k.spawn(prompt, params)
    for _ in range(6):
        k.step()
    assert p.num_output_tokens > 0
    k.suspend(p.pid)
    check(k)
    row = k.ps()[0]
    assert row["state"] == "SUSPENDED" and row["resident_blocks"] == 0
    assert row["swapped_blocks"] == (1 if swap_slots else 0)
    assert p.num_computed_tokens == (p.num_tokens - 1 if swap_slots else 0)
    for _ in range(3):
        k.step()
    k.resume(p.pid)
    k.run_until_done()
    check(k)
    assert p.output_token_ids == expected[4]


def test_same_tokens_after_hibernate_and_restore_into_a_new_kernel(lstm_dir, tmp_path, expected):
    store = tmp_path / "store"
    k = make(lstm_dir, store, swap_slots=4)
    ps = [k.spawn(prompt, params) for prompt, params in SPECS[3:6]]
    for _ in range(5):
        k.step()
    k.suspend(ps[1].pid)  # its state goes to swap; hibernate reads it from there
    hids = [k.hibernate(p.pid) for p in ps]
    check(k)
    assert k.block_manager.num_used_blocks == 0 and k.block_manager.num_free_swap_blocks == 4
    image = HibernationStore(store).load(hids[0], "local")
    assert image.kv is None and image.state.shape == (LAYERS, 2, HIDDEN) and image.num_computed_tokens > 0
    k2 = make(lstm_dir, store)
    restored = [k2.restore(h) for h in hids]
    assert all(q.num_computed_tokens > 0 for q in restored), "the state came back, no recompute"
    while k2.has_work():
        k2.step()
        check(k2)
    assert [q.output_token_ids for q in restored] == expected[3:6]


def test_state_images_are_checked_and_refused_by_another_model(lstm_dir, tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    k = make(lstm_dir, store)
    p = k.spawn(ids(10, 1), SamplingParams(max_tokens=10, **GREEDY))
    k.step()
    hid = k.hibernate(p.pid)
    with pytest.raises(HibernationError, match="not the model this kernel runs"):
        Kernel(tiny_model_dir, KernelConfig(kv_memory="16MiB", hibernate_dir=str(store))).restore(hid)
    image = HibernationStore(store).load(hid, "local")
    for change, problem in [(dict(num_computed_tokens=0), "state is present but num_computed_tokens is 0"),
                            (dict(kv=torch.zeros(2, 2, 1, CONTEXT, 1, HIDDEN)), "kv and state are both present"),
                            (dict(state=torch.zeros(2, HIDDEN)), "expected floating point .num_layers, 2, hidden.")]:
        bad = HibernationImage(**{**{f.name: getattr(image, f.name) for f in fields(image)}, **change})
        with pytest.raises(ValueError, match=problem):
            save_image(tmp_path / "bad.safetensors", bad)
    assert make(lstm_dir, store).restore(hid).num_computed_tokens == 10


def test_fork_shares_the_slot_copies_it_on_write_and_children_sample_like_fresh_processes(lstm_dir, tmp_path,
                                                                                         model):
    k = make(lstm_dir, tmp_path)
    bm = k.block_manager
    prompt = ids(20, seed=9)
    parent = k.spawn(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True))
    for _ in range(5):
        k.step()
    at_fork = list(parent.token_ids)
    children = k.fork(parent.pid, 3)
    check(k)
    assert bm.num_used_blocks == 1 and bm.ref_counts[bm.block_table(parent.pid)[0]] == 4, "one shared slot"
    k.step()
    check(k)
    assert bm.num_used_blocks == 4, "each writer copied the shared slot first"
    while k.has_work():
        k.step()
        check(k)
    assert [c.params.seed for c in children] == [(7 * 1_000_003 + i) % 2**63 for i in (1, 2, 3)]
    left = 20 - (len(at_fork) - len(prompt))
    for c in children:
        assert c.token_ids[:len(at_fork)] == at_fork
        fresh = brute_force(model, at_fork, SamplingParams(max_tokens=left, temperature=1.0, seed=c.params.seed,
                                                           ignore_eos=True))
        assert c.output_token_ids[len(at_fork) - len(prompt):] == fresh
    assert parent.output_token_ids == brute_force(model, prompt, parent.params)
    assert len({tuple(c.output_token_ids) for c in children}) > 1, "children sample independently"


def test_parallel_sampling_forks_at_the_first_token(lstm_dir, tmp_path, model):
    k = make(lstm_dir, tmp_path)
    prompt = ids(30, seed=10)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    parent = k.spawn(prompt, params, n=4)
    while k.has_work():
        k.step()
        check(k)
    kids = [k.processes[pid] for pid in k.children(parent.pid)]
    assert len(kids) == 3
    for p in [parent, *kids]:
        assert p.output_token_ids == brute_force(model, prompt, p.params)


def test_per_owner_slot_limit_makes_processes_wait(lstm_dir, tmp_path, expected):
    k = make(lstm_dir, tmp_path, max_blocks_per_owner=1)
    pids = [k.spawn(prompt, params).pid for prompt, params in SPECS[:3]]
    while k.has_work():
        k.step()
        check(k)
        assert k.owner_blocks("local") <= 1
    assert [k.processes[pid].output_token_ids for pid in pids] == expected[:3]


def test_randomized_syscalls_keep_slot_accounting(lstm_dir, tmp_path):
    rng = random.Random(5)
    k = make(lstm_dir, tmp_path, slots=4, swap_slots=2, max_num_seqs=6, max_num_batched_tokens=24)
    live = []
    for _ in range(250):
        r = rng.random()
        if r < 0.25:
            live.append(k.spawn(ids(rng.randint(1, 40), rng.randrange(10**6)),
                                SamplingParams(max_tokens=rng.randint(1, 20), temperature=1.0, seed=rng.randrange(99))))
        live = [p for p in live if not p.is_finished]
        if live and r > 0.9:
            p = rng.choice(live)
            action = rng.choice(["kill", "suspend", "resume", "fork", "hibernate"])
            if action == "kill":
                k.kill(p.pid)
            elif action == "suspend" and p.state in (ProcState.READY, ProcState.RUNNING):
                k.suspend(p.pid)
            elif action == "resume" and p.state is ProcState.SUSPENDED:
                k.resume(p.pid)
            elif action == "fork" and p.state in (ProcState.READY, ProcState.RUNNING):
                live += k.fork(p.pid, 1)
            elif action == "hibernate" and p.state is not ProcState.NEW:
                live.append(k.restore(k.hibernate(p.pid)))
        k.step()
        check(k)
    for p in live:
        if p.state is ProcState.SUSPENDED:
            k.resume(p.pid)
    k.run_until_done()
    check(k)
    assert k.block_manager.num_used_blocks == 0
    assert k.block_manager.num_free_swap_blocks == k.block_manager.num_swap_blocks
    assert all(p.is_finished for p in k.processes.values())


def test_llmos_run_serves_a_saved_lstm(lstm_dir, tmp_path, monkeypatch, model):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    prompt = "In the beginning God created"
    result = CliRunner().invoke(cli.app, ["run", "--model", str(lstm_dir), prompt, "--max-tokens", "8",
                                          "--temperature", "0", "--ignore-eos"])
    assert result.exit_code == 0, result.output
    assert "8 output tokens" in result.stderr
    k = make(lstm_dir, tmp_path)
    tokens = brute_force(model, k.tokenizer.encode(prompt), SamplingParams(max_tokens=8, **GREEDY))
    assert result.stdout_bytes.decode() == k.tokenizer.decode(tokens) + "\n"
