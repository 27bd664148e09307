"""The kernel end to end on a tiny model: transformers as the oracle, determinism, accounting, stops, bad input."""

import random

import pytest
import torch
import transformers as T

from llmos.errors import InvalidRequestError, OutOfBlocksError, ProcessNotFoundError
from llmos.kernel import syscalls
from llmos.kernel.kernel import Kernel, KernelConfig
from llmos.kernel.kvcache import KVPool
from llmos.kernel.proc import ProcState
from llmos.model.sampling import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def pool_bytes(num_blocks, block_size):
    """A KV budget of exactly `num_blocks` blocks for the tiny model (2 layers, 2 KV heads of 16)."""
    return num_blocks * KVPool.bytes_per_block(2, 2, 16, block_size, torch.float32)


@pytest.fixture(scope="module")
def kernel(tiny_model_dir):
    return Kernel(tiny_model_dir, KernelConfig(kv_memory="64MiB", max_num_batched_tokens=256))


def prompts(n, seed=0, lo=3, hi=60, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def check_accounting(k: Kernel):
    k.block_manager.check_invariants()
    bm = k.block_manager
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    for p in k.processes.values():
        if p.is_finished or p.state is not ProcState.RUNNING:
            assert bm.block_table(p.pid) == [], f"{p} holds blocks"


def test_greedy_equals_transformers_generate(kernel, tiny_model_dir):
    hf = T.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for prompt in prompts(3, seed=1):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
        pid = syscalls.spawn(kernel, prompt, SamplingParams(max_tokens=40, **GREEDY))
        assert syscalls.wait(kernel, pid).token_ids == ref


def run_all(k: Kernel, specs):
    pids = [syscalls.spawn(k, prompt, params) for prompt, params in specs]
    while k.has_work():
        k.step()
        check_accounting(k)
    return [k.processes[pid].output_token_ids for pid in pids]


def mixed_specs(n, seed):
    specs = []
    for i, prompt in enumerate(prompts(n, seed=seed)):
        if i % 3 == 0:
            params = SamplingParams(max_tokens=24, **GREEDY)
        else:
            params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=1000 + i, ignore_eos=True)
        specs.append((prompt, params))
    return specs


def test_same_tokens_alone_in_batch_and_after_preemption(tiny_model_dir, kernel):
    """ARCHITECTURE.md invariant: a seeded or greedy process yields the same tokens whatever else runs."""
    specs = mixed_specs(16, seed=2)
    alone = [run_all(kernel, [spec])[0] for spec in specs]
    batched = run_all(kernel, specs)
    assert batched == alone
    # A pool of 24 blocks of 4 tokens cannot hold 16 processes of up to 84 tokens: preemption must happen.
    small = Kernel(tiny_model_dir, KernelConfig(kv_memory=pool_bytes(24, 4), block_size=4,
                                                 max_num_batched_tokens=64))
    assert small.block_manager.num_blocks == 24
    preempted = run_all(small, specs)
    assert sum(p.num_preemptions for p in small.processes.values()) > 0
    assert preempted == alone


def test_chunked_prefill_matches_unchunked(tiny_model_dir, kernel):
    specs = mixed_specs(4, seed=3)
    chunked = Kernel(tiny_model_dir, KernelConfig(kv_memory="16MiB", max_num_batched_tokens=7))
    assert run_all(chunked, specs) == [run_all(kernel, [s])[0] for s in specs]


def test_randomized_workload_with_kills_keeps_accounting(tiny_model_dir):
    rng = random.Random(4)
    k = Kernel(tiny_model_dir, KernelConfig(kv_memory=pool_bytes(40, 4), block_size=4,
                                            max_num_batched_tokens=48))
    live = []
    for step in range(400):
        if rng.random() < 0.3:
            prompt = prompts(1, seed=rng.randrange(10**6))[0]
            live.append(syscalls.spawn(k, prompt, SamplingParams(max_tokens=rng.randint(1, 30), temperature=1.0,
                                                                 seed=rng.randrange(100))))
        if live and rng.random() < 0.05:
            syscalls.kill(k, live.pop(rng.randrange(len(live))))
        k.step()
        check_accounting(k)
    k.run_until_done()
    check_accounting(k)
    assert k.block_manager.num_used_blocks == 0
    assert all(p.is_finished for p in k.processes.values())


def test_stream_concatenates_to_text_and_stop_string(kernel):
    params = SamplingParams(max_tokens=30, **GREEDY)
    pid = syscalls.spawn(kernel, "In the beginning", params)
    deltas = list(syscalls.stream(kernel, pid))
    full = syscalls.result(kernel, kernel.processes[pid]).text
    assert "".join(deltas) == full and len(full) > 4
    stop = full[3:5]
    pid = syscalls.spawn(kernel, "In the beginning", SamplingParams(max_tokens=30, stop=(stop,), **GREEDY))
    streamed = "".join(syscalls.stream(kernel, pid))
    res = syscalls.wait(kernel, pid)
    assert res.finish_reason == "stop"
    assert streamed == res.text == full[: full.index(stop)]


def test_stop_token_ids_and_eos(kernel):
    pid = syscalls.spawn(kernel, "In the beginning", SamplingParams(max_tokens=20, **GREEDY))
    out = syscalls.wait(kernel, pid).token_ids
    stop_id = out[5]
    pid = syscalls.spawn(kernel, "In the beginning", SamplingParams(max_tokens=20, stop_token_ids=(stop_id,), **GREEDY))
    res = syscalls.wait(kernel, pid)
    assert res.finish_reason == "stop" and res.token_ids == out[: out.index(stop_id) + 1]
    kernel.eos_token_ids.add(stop_id)
    try:
        pid = syscalls.spawn(kernel, "In the beginning", SamplingParams(max_tokens=20, temperature=0))
        assert syscalls.wait(kernel, pid).token_ids == out[: out.index(stop_id) + 1]
    finally:
        kernel.eos_token_ids.discard(stop_id)


def test_max_tokens_and_context_window(tiny_model_dir):
    k = Kernel(tiny_model_dir, KernelConfig(kv_memory="16MiB"))
    res = syscalls.wait(k, syscalls.spawn(k, [5] * 250, SamplingParams(max_tokens=100, **GREEDY)))
    assert res.finish_reason == "length" and len(res.token_ids) == 256 - 250


def test_kill_frees_blocks_at_once(kernel):
    pid = syscalls.spawn(kernel, "In the beginning", SamplingParams(max_tokens=100, **GREEDY))
    kernel.step()
    assert kernel.block_manager.block_table(pid)
    syscalls.kill(kernel, pid)
    assert kernel.block_manager.block_table(pid) == []
    assert kernel.processes[pid].state is ProcState.KILLED
    check_accounting(kernel)


def test_owner_isolation(kernel):
    pid = syscalls.spawn(kernel, "hello", SamplingParams(max_tokens=2), owner="alice")
    with pytest.raises(ProcessNotFoundError):
        syscalls.kill(kernel, pid, owner="bob")
    assert all(row["owner"] == "bob" for row in syscalls.ps(kernel, owner="bob", all=True))
    syscalls.wait(kernel, pid, owner="alice")


@pytest.mark.parametrize("prompt,params,match", [
    ("", SamplingParams(), "empty"),
    ("x " * 400, SamplingParams(), "context window"),
    ("hi", SamplingParams(temperature=-1), "temperature"),
    ("hi", SamplingParams(top_p=0), "top_p"),
    ("hi", SamplingParams(top_p=1.5), "top_p"),
    ("hi", SamplingParams(max_tokens=0), "max_tokens"),
])
def test_bad_requests(kernel, prompt, params, match):
    with pytest.raises(InvalidRequestError, match=match):
        syscalls.spawn(kernel, prompt, params)


def test_request_that_can_never_fit(tiny_model_dir):
    k = Kernel(tiny_model_dir, KernelConfig(kv_memory=pool_bytes(4, 16)))
    with pytest.raises(OutOfBlocksError, match="KV blocks"):
        syscalls.spawn(k, "hello", SamplingParams(max_tokens=200))


@pytest.mark.parametrize("name", ["hpu", "meta", "mps", "privateuseone", "cpu:1", "opengl", "cuda:x", ""])
def test_unsupported_devices_are_refused(name):
    from llmos.kernel.kernel import resolve_device
    with pytest.raises(InvalidRequestError, match="device"):
        resolve_device(name)


def test_cuda_is_refused_where_absent_and_cpu_accepted():
    from llmos.kernel.kernel import resolve_device
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequestError, match="not available"):
            resolve_device("cuda")
