"""The OpenAI-compatible API through the official `openai` client, against an in-process kernel as the oracle:
greedy output, logprobs and token counts must equal what `syscalls` gives on a fresh Kernel of the same model
for the same token prompt. Also streaming, n, stop, seed, errors, quotas and client disconnects."""

from __future__ import annotations

import contextlib
import json
import math
import time

import httpx
import openai
import pytest

from llmos.kernel import syscalls
from llmos.kernel.kernel import Kernel, KernelConfig
from llmos.kernel.proc import ProcState
from llmos.model.sampling import SamplingParams
from llmos.server.app import ApiError

PROMPT_IDS = [5, 17, 42, 99, 3, 250, 11]


@pytest.fixture(scope="module")
def model(server):
    return server.settings.preload[0]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, llmos_home):
    """A fresh in-process kernel of the served model."""
    return Kernel(tiny_model_dir, KernelConfig(kv_memory="8MiB", swap_memory=0))


def run_oracle(kernel: Kernel, ids: list[int], **params):
    pid = syscalls.spawn(kernel, ids, SamplingParams(**params))
    return syscalls.wait(kernel, pid), kernel.streams[pid].logprobs


@contextlib.contextmanager
def slow_engine(engine, seconds: float = 0.02):
    """Make each engine step take `seconds` longer, so a generation is still running when the test acts."""
    hook = lambda kernel, tokens: time.sleep(seconds)  # noqa: E731
    engine.step_hooks.append(hook)
    try:
        yield
    finally:
        engine.step_hooks.remove(hook)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_models_lists_every_available_model(client, model, server):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == set(server.state.models.available())
    assert models[model].owned_by == "llmos" and models[model].object == "model"
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_greedy_completion_equals_the_kernel_oracle(client, model, oracle):
    expected, lps = run_oracle(oracle, PROMPT_IDS, max_tokens=12, temperature=0, logprobs=3)
    r = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=12, temperature=0, logprobs=3)
    choice = r.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(PROMPT_IDS)
    assert r.usage.completion_tokens == len(expected.token_ids) == len(choice.logprobs.tokens)
    assert r.usage.total_tokens == len(PROMPT_IDS) + len(expected.token_ids)
    tokenizer = oracle.tokenizer
    offset = 0
    for i, (token, (lp, top)) in enumerate(zip(expected.token_ids, lps)):
        text = tokenizer.decode([token], skip_special_tokens=False)
        assert choice.logprobs.tokens[i] == text
        assert choice.logprobs.token_logprobs[i] == pytest.approx(lp, abs=1e-4)
        assert choice.logprobs.text_offset[i] == offset
        offset += len(text)
        want = {}
        for t, v in [*top, (token, lp)]:  # the legacy format keys by text: equal texts keep the likeliest
            want.setdefault(tokenizer.decode([t], skip_special_tokens=False), v)
        assert choice.logprobs.top_logprobs[i] == pytest.approx(want, abs=1e-4)


def test_text_prompt_and_echo(client, model, oracle):
    prompt = "In the beginning"
    expected, _ = run_oracle(oracle, oracle.tokenizer.encode(prompt), max_tokens=6, temperature=0)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text == prompt + expected.text
    assert r.usage.prompt_tokens == len(oracle.tokenizer.encode(prompt))


def test_completion_stream_matches_the_non_streamed_one(client, model, server):
    args = dict(model=model, prompt=PROMPT_IDS, max_tokens=10, temperature=0)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    # the SSE framing itself
    with httpx.stream("POST", server.url + "/v1/completions", json={**args, "stream": True}, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = resp.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") and json.loads(e[6:])["object"] == "text_completion" for e in events[:-2])


def test_chat_uses_the_chat_template_and_equals_the_oracle(client, model, oracle):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    tokenizer = oracle.tokenizer
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert not tokenizer.has_chat_template and text.endswith("Assistant:")  # the tiny model gets the plain one
    ids = tokenizer.encode(text)
    expected, lps = run_oracle(oracle, ids, max_tokens=8, temperature=0, logprobs=2)
    r = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected.token_ids)
    assert len(choice.logprobs.content) == len(expected.token_ids)
    for entry, token, (lp, top) in zip(choice.logprobs.content, expected.token_ids, lps):
        assert entry.token == tokenizer.decode([token], skip_special_tokens=False)
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(lp, abs=1e-4)
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-4)


def test_chat_stream_and_greedy_n(client, model):
    messages = [{"role": "user", "content": "Count to three"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, n=2)
    assert len(whole.choices) == 2 and whole.choices[0].message.content == whole.choices[1].message.content
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, n=2,
                                                 stream=True))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[i].message.content
        assert mine[-1].finish_reason == whole.choices[i].finish_reason


def test_n_seeded_samples_are_distinct_children_of_one_process(client, model, server):
    kernel = server.state.models.get(model).kernel
    args = dict(model=model, prompt="The quick brown fox", max_tokens=8, temperature=1.0, seed=7, n=3)
    r = client.completions.create(**args)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3
    with kernel.lock:
        newest = sorted(kernel.processes)[-3:]
        parent = kernel.processes[newest[0]]
        assert parent.parent is None and kernel.children(parent.pid) == newest[1:]
    # Choice 0 (the parent) is reproducible and equals the n=1 run; the kernel derives the children's seeds
    # from the parent's seed and pid, so they differ between requests.
    again = client.completions.create(**args)
    assert sorted(again.choices, key=lambda c: c.index)[0].text == texts[0]
    assert client.completions.create(**{**args, "n": 1}).choices[0].text == texts[0]
    streamed = {}
    for c in client.completions.create(**args, stream=True):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert sorted(streamed) == [0, 1, 2] and streamed[0] == texts[0]
    greedy = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_seed_reproducibility(client, model):
    args = dict(model=model, prompt=PROMPT_IDS, max_tokens=12, temperature=1.0)
    a = client.completions.create(**args, seed=1234).choices[0].text
    assert client.completions.create(**args, seed=1234).choices[0].text == a
    assert any(client.completions.create(**args, seed=s).choices[0].text != a for s in (1, 2, 3))


def test_stop_strings(client, model):
    args = dict(model=model, prompt=PROMPT_IDS, max_tokens=40, temperature=1.0, seed=5)
    full = client.completions.create(**args).choices[0].text
    candidates = [ch for ch in full[2:] if ch.isascii() and ch.isalnum()]
    assert len(candidates) >= 2, f"seeded output too short to test stop strings: {full!r}"
    stop = candidates[0]
    r = client.completions.create(**args, stop=stop).choices[0]
    assert r.text == full[:full.find(stop)] and r.finish_reason == "stop"
    stops = [candidates[1], "\u2603never"]
    r = client.completions.create(**args, stop=stops).choices[0]
    assert r.text == full[:full.find(candidates[1])] and r.finish_reason == "stop"
    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=40,
                                       temperature=1.0, seed=5, stop=[stop]).choices[0]
    assert stop not in c.message.content


@pytest.mark.parametrize("bad, words", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 0.5}, "not supported"),
    ({"frequency_penalty": -1}, "not supported"),
    ({"max_tokens": "lots"}, "max_tokens"),
    ({"logprobs": 6}, "logprobs"),
    ({"n": 0}, "n"),
])
def test_bad_parameters_are_400(client, model, bad, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hi", max_tokens=2, extra_body=bad)
    assert words in err.value.body["message"] and err.value.body["type"] == "invalid_request_error"


def test_chat_bad_parameters_are_400(client, model):
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], presence_penalty=1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=model, messages=[])


@pytest.mark.parametrize("messages, words", [
    ([{"role": "robot", "content": "x"}], "messages.0.role: must be one of system, developer, user, assistant, tool"),
    ([{"content": "x"}], "messages.0.role: required"),
    ([{"role": "user"}], "messages.0.content: required"),
    ([{"role": "user", "content": None}], "messages.0.content: required"),
    ([{"role": "user", "content": 5}], "messages.0.content: must be a string or a list of text parts"),
    ([{"role": "user", "content": {"text": "x"}}], "messages.0.content: must be a string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages.0.content: must be a string or a list of text"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages.0.content: must be a string or"),
    ([{"role": "user", "content": ["x"]}], "messages.0.content: must be a string or a list of text parts"),
    ([{"role": "user", "content": "x"}, "hello"], "messages.1: must be an object"),
])
def test_chat_malformed_messages_are_400_naming_the_field(client, model, messages, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    assert words in err.value.body["message"] and err.value.body["type"] == "invalid_request_error"


def test_chat_text_parts_are_joined_and_developer_is_system(client, model):
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    args = dict(model=model, max_tokens=6, temperature=0)
    a, b = client.chat.completions.create(messages=plain, **args), client.chat.completions.create(messages=parts, **args)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="only text content parts"):
        client.chat.completions.create(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}], **args)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", True), ("temperature", False), ("n", True), ("top_p", True), ("seed", False),
    ("presence_penalty", False), ("frequency_penalty", False), ("max_completion_tokens", True),
    ("top_logprobs", True), ("logit_bias", {"5": True}),
])
def test_chat_numbers_given_as_booleans_are_400(client, model, field, value):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       extra_body={field: value, **extra})
    message = err.value.body["message"]
    assert message.startswith(f"invalid request: {field}") and "a number, not a boolean" in message


@pytest.mark.parametrize("field, value", [
    ("max_tokens", True), ("temperature", False), ("n", True), ("logprobs", True), ("best_of", True),
    ("prompt", [True, 5]), ("prompt", [[5, False]]),
])
def test_completion_numbers_given_as_booleans_are_400(client, model, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hi", extra_body={field: value})
    message = err.value.body["message"]
    assert message.startswith(f"invalid request: {field}") and "not a boolean" in message


def test_unknown_model_is_404_and_long_prompt_is_413(client, model):
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=model, prompt=[7] * 300, max_tokens=2)
    assert err.value.status_code == 413 and "context window" in err.value.body["message"]


def test_usage_is_charged_and_quota_is_checked(client, model, server, monkeypatch):
    before = server.state.rate.used("local")
    r = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5, temperature=0)
    assert server.state.rate.used("local") - before == r.usage.total_tokens
    before = server.state.rate.used("local")
    chunks = list(client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert wait_until(lambda: server.state.rate.used("local") - before == chunks[-1].usage.total_tokens)

    def over(p):
        raise ApiError(429, "quota_exceeded", "over quota", {"Retry-After": "7"})

    monkeypatch.setattr(server.state.rate, "check", over)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=model, prompt="hi", max_tokens=2)
    assert err.value.response.headers["retry-after"] == "7"


def _newest(kernel):
    with kernel.lock:
        return kernel.processes[max(kernel.processes)]


def test_client_disconnect_mid_stream_kills_the_process_and_frees_its_blocks(model, server):
    r = server.state.models.get(model)
    kernel = r.kernel
    assert wait_until(lambda: not kernel.has_work())
    before = kernel.block_manager.num_used_blocks
    body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": 200, "temperature": 0.8, "seed": 3, "stream": True,
            "n": 2}
    with slow_engine(r.engine), httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
            lines, events = resp.iter_lines(), 0  # (a finished or dropped iterator would close the stream)
            while events < 2:
                events += next(lines).startswith("data: {")
            p = _newest(kernel)  # a child: the parent forked it after the prompt
            parent = kernel.processes[p.parent]
            assert not p.is_finished and not parent.is_finished
            assert kernel.block_manager.num_used_blocks > before
        assert wait_until(lambda: p.state is ProcState.KILLED and parent.state is ProcState.KILLED)
        assert wait_until(lambda: kernel.block_manager.num_used_blocks == before)
        assert p.num_output_tokens < 200


def test_client_gone_from_a_non_streaming_request_kills_the_process(model, server):
    r = server.state.models.get(model)
    kernel = r.kernel
    assert wait_until(lambda: not kernel.has_work())
    before = kernel.block_manager.num_used_blocks
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 0.8,
            "seed": 3}
    with slow_engine(r.engine, 0.03):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.6)
        p = _newest(kernel)
        assert wait_until(lambda: p.state is ProcState.KILLED)
        assert wait_until(lambda: kernel.block_manager.num_used_blocks == before)
        assert p.num_output_tokens < 200 and math.isfinite(p.finish_time)
