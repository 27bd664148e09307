"""The Ollama-compatible API through the official `ollama` client (and raw HTTP for the NDJSON framing), with
an in-process kernel as the oracle for greedy output and token counts."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import ollama
import pytest

from llmos.kernel import syscalls
from llmos.kernel.kernel import Kernel, KernelConfig
from llmos.kernel.proc import ProcState
from llmos.model.sampling import SamplingParams
from llmos.server.app import ApiError
from llmos.server.ollama_api import keep_alive_seconds

GREEDY = {"temperature": 0, "num_predict": 10}


@pytest.fixture(scope="module")
def model(server):
    return server.settings.preload[0]


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, llmos_home):
    return Kernel(tiny_model_dir, KernelConfig(kv_memory="8MiB", swap_memory=0))


def run_oracle(kernel: Kernel, ids: list[int], **params) -> syscalls.Result:
    return syscalls.wait(kernel, syscalls.spawn(kernel, ids, SamplingParams(**params)))


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_generate_equals_the_kernel_oracle(client, model, oracle):
    prompt = "In the beginning"
    ids = oracle.tokenizer.encode(prompt)  # a model without a chat template: the prompt as is
    expected = run_oracle(oracle, ids, max_tokens=10, temperature=0)
    r = client.generate(model=model, prompt=prompt, options=GREEDY)
    assert r.done and r.response == expected.text
    assert r.done_reason == expected.finish_reason
    assert r.prompt_eval_count == len(ids) and r.eval_count == len(expected.token_ids)
    assert list(r.context) == ids + expected.token_ids
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(r, name), int) and getattr(r, name) >= 0
    assert r.total_duration >= r.prompt_eval_duration
    chunks = list(client.generate(model=model, prompt=prompt, options=GREEDY, stream=True))
    assert "".join(c.response for c in chunks) == expected.text
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].eval_count == len(expected.token_ids) and chunks[-1].done_reason == r.done_reason


def test_generate_options_seed_stop_and_context(client, model):
    options = {"temperature": 1.0, "seed": 11, "num_predict": 30, "top_k": 0, "top_p": 1.0}
    a = client.generate(model=model, prompt="The quick brown fox", options=options)
    assert client.generate(model=model, prompt="The quick brown fox", options=options).response == a.response
    stop = next(ch for ch in a.response[2:] if ch.isascii() and ch.isalnum())
    cut = client.generate(model=model, prompt="The quick brown fox", options={**options, "stop": [stop]})
    assert cut.response == a.response[:a.response.find(stop)] and cut.done_reason == "stop"
    more = client.generate(model=model, prompt=" and", context=a.context, options={"num_predict": 3})
    assert list(more.context[:len(a.context)]) == list(a.context)
    assert more.prompt_eval_count > len(a.context)


def test_chat_streaming_and_not(client, model, oracle):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ids = oracle.tokenizer.encode(oracle.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    expected = run_oracle(oracle, ids, max_tokens=10, temperature=0)
    r = client.chat(model=model, messages=messages, options=GREEDY)
    assert r.message.role == "assistant" and r.message.content == expected.text
    assert r.prompt_eval_count == len(ids) and r.eval_count == len(expected.token_ids) and r.done
    chunks = list(client.chat(model=model, messages=messages, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in chunks) == expected.text
    assert chunks[-1].done and chunks[-1].done_reason == r.done_reason


def test_ndjson_framing_and_stream_by_default(server, model):
    with httpx.stream("POST", server.url + "/api/generate", timeout=30,
                      json={"model": model, "prompt": "hello", "options": GREEDY, "logprobs": True,
                            "top_logprobs": 2}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/x-ndjson"
        body = resp.read().decode()
    assert body.endswith("\n")
    lines = [json.loads(line) for line in body.splitlines()]
    assert all(line["model"] == model and "created_at" in line for line in lines)
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    final = lines[-1]
    assert final["eval_count"] == sum(len(line["logprobs"]) for line in lines)
    assert all(len(e["top_logprobs"]) == 2 for line in lines for e in line["logprobs"])
    whole = httpx.post(server.url + "/api/generate", json={"model": model, "prompt": "hello", "options": GREEDY,
                                                           "stream": False}, timeout=30).json()
    assert whole["response"] == "".join(line["response"] for line in lines)


def test_tags_ps_show_version(client, model, server):
    tags = {m.model: m for m in client.list().models}
    assert set(tags) == set(server.state.models.available())
    mine = tags[model]
    assert mine.size > 0 and mine.modified_at is not None
    assert mine.details.family == "llama" and mine.details.quantization_level == "F32"
    assert mine.details.parameter_size.endswith("K")
    loaded = {m.model: m for m in client.ps().models}
    assert model in loaded and loaded[model].size > mine.size and loaded[model].expires_at is not None
    assert loaded[model].context_length == 256
    shown = client.show(model)
    assert shown.details.family == "llama" and shown.modelinfo["llama.context_length"] == 256
    assert httpx.get(server.url + "/api/version").json()["version"]


def test_errors_are_top_level_strings(client, model, server):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="no-such-model", prompt="hi")
    assert err.value.status_code == 404 and isinstance(err.value.error, str) and "not found" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}], stream=True).__next__()
    assert err.value.status_code == 404 and "not found" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=model, prompt="hi", options={"temperature": -1})
    assert err.value.status_code == 400 and "temperature" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=model, prompt="hi", format="json")
    assert err.value.status_code == 400 and "not supported" in err.value.error
    r = httpx.post(server.url + "/api/generate", json={"model": model, "prompt": 5})
    assert r.status_code == 400 and r.json()["error"].startswith("invalid request: prompt")
    r = httpx.post(server.url + "/api/chat", json={"model": model, "messages": [{"role": "user", "content": "x"}],
                                                    "options": {"num_predict": 4}, "keep_alive": "soon"})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]


@pytest.mark.parametrize("message, words", [
    ({"role": "robot", "content": "x"}, "messages.0.role: must be one of system, user, assistant, tool"),
    ({"role": "developer", "content": "x"}, "messages.0.role: must be one of system, user, assistant, tool"),
    ({"role": "user"}, "messages.0.content: required: a string"),
])
def test_chat_malformed_messages_through_the_client_are_400(client, model, message, words):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=model, messages=[message], options=GREEDY)
    assert err.value.status_code == 400 and words in err.value.error


@pytest.mark.parametrize("messages, words", [
    ([{"content": "x"}], "messages.0.role: required: one of system, user, assistant, tool"),
    ([{"role": "user", "content": None}], "messages.0.content: required: a string"),
    ([{"role": "user", "content": 5}], "messages.0.content: must be a string"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "messages.0.content: must be a string"),
    ([{"role": 1, "content": "x"}], "messages.0.role: must be one of system, user, assistant, tool"),
    (["hello"], "messages.0: must be an object"),
])
def test_chat_malformed_messages_are_400(server, model, messages, words):
    r = httpx.post(server.url + "/api/chat", json={"model": model, "messages": messages, "stream": False})
    assert r.status_code == 400 and words in r.json()["error"] and r.json()["type"] == "invalid_request_error"


@pytest.mark.parametrize("field, value", [
    ("temperature", False), ("num_predict", True), ("top_k", True), ("top_p", True), ("seed", False),
    ("min_p", False), ("repeat_penalty", True), ("presence_penalty", True), ("mirostat", True),
])
def test_options_given_as_booleans_are_400(client, model, field, value):
    for call in (lambda: client.chat(model=model, messages=[{"role": "user", "content": "x"}],
                                     options={**GREEDY, field: value}),
                 lambda: client.generate(model=model, prompt="x", options={**GREEDY, field: value})):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 400
        assert err.value.error.startswith(f"invalid request: options.{field}: must be a number, not a boolean")


@pytest.mark.parametrize("field, value", [("top_logprobs", True), ("keep_alive", True), ("context", [1, True])])
def test_numbers_given_as_booleans_are_400(server, model, field, value):
    r = httpx.post(server.url + "/api/generate", json={"model": model, "prompt": "x", "stream": False,
                                                        "options": GREEDY, "logprobs": True, field: value})
    assert r.status_code == 400 and r.json()["error"].startswith(f"invalid request: {field}")
    assert "not a boolean" in r.json()["error"]


def test_keep_alive_durations():
    assert keep_alive_seconds(None) is False
    assert keep_alive_seconds("5m") == 300 and keep_alive_seconds("1h30m") == 5400
    assert keep_alive_seconds("300ms") == pytest.approx(0.3) and keep_alive_seconds("0") == 0
    assert keep_alive_seconds(-1) is None and keep_alive_seconds("-1m") is None and keep_alive_seconds(90) == 90
    for bad in ("soon", "5 m", "m", ""):
        with pytest.raises(ApiError):
            keep_alive_seconds(bad)


def test_client_disconnect_mid_stream_kills_the_process(server, model):
    r = server.state.models.get(model)
    kernel = r.kernel
    assert wait_until(lambda: not kernel.has_work())
    before = kernel.block_manager.num_used_blocks
    hook = lambda kernel, tokens: time.sleep(0.02)  # noqa: E731
    r.engine.step_hooks.append(hook)
    try:
        with httpx.stream("POST", server.url + "/api/chat", timeout=30,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                "options": {"num_predict": 200, "seed": 3}}) as resp:
            lines = resp.iter_lines()
            next(lines), next(lines)
            with kernel.lock:
                p = kernel.processes[max(kernel.processes)]
            assert not p.is_finished
    finally:
        with contextlib.suppress(ValueError):
            r.engine.step_hooks.remove(hook)
    assert wait_until(lambda: p.state is ProcState.KILLED)
    assert wait_until(lambda: kernel.block_manager.num_used_blocks == before)


def test_keep_alive_zero_unloads_after_the_request_and_an_empty_prompt_loads(client, model, server):
    r = client.generate(model=model, prompt="hi", options={"num_predict": 2}, keep_alive=0)
    assert r.done
    assert wait_until(lambda: model not in [m.model for m in client.ps().models], timeout=5)
    loaded = client.generate(model=model + ":latest")  # no prompt: load it (Ollama clients add ":latest")
    assert loaded.done_reason == "load" and model in [m.model for m in client.ps().models]
    unloaded = client.generate(model=model, keep_alive="0")
    assert unloaded.done_reason == "unload"
    assert wait_until(lambda: model not in [m.model for m in client.ps().models], timeout=5)
    assert client.generate(model=model, prompt="hi", options={"num_predict": 2}, keep_alive=-1).done
    expires = next(m.expires_at for m in client.ps().models if m.model == model)
    assert expires.year > 2200  # kept loaded


def test_every_error_under_api_carries_the_message_string(server):
    r = httpx.post(server.url + "/api/generate", content=b"x" * (server.settings.max_body_bytes + 1))
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
    r = httpx.post(server.url + "/api/generate", content=b"{not json")
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(server.url + "/api/pull", json={"model": "x"})
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
