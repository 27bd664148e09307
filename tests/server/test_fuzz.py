"""Hostile request bodies at every JSON endpoint of the daemon (issue 4, section 5): the answer is a 4xx with a JSON
`error` body (or, for a body that happens to be valid, a 2xx), never a 500 and never a hang, and the daemon is alive
afterwards with no failed kernel step. A fixed list of named attacks runs at every endpoint, then hypothesis mutates
each endpoint's valid body with wrong types, huge and non-finite numbers, long and odd strings and nesting."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _server_conftest():
    # `from conftest import` would get whichever conftest.py pytest imported last (the names clash).
    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("llmos_tests_server_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


start_server = _server_conftest().start_server

MAX_BODY = 256 * 1024
TIMEOUT_S = 30.0  # a request slower than this is a hang
DEPTH = 10_000

ENDPOINTS = ["completions", "chat", "ollama-generate", "ollama-chat", "ollama-show", "spawn", "session-create",
             "session-message", "fork", "renice", "restore"]


@pytest.fixture(scope="module")
def target(tiny_model_dir, llmos_home):
    """A single-user daemon, a session, a live (suspended) process to fork and renice, and each endpoint's path and
    smallest valid body."""
    server = start_server(tiny_model_dir, max_body_bytes=MAX_BODY)
    model = server.settings.preload[0]
    http = httpx.Client(base_url=server.url, timeout=TIMEOUT_S)
    sid = http.post("/v1/sessions", json={"model": model}).json()["id"]
    r = http.post("/v1/processes", json={"model": model, "prompt": "hi", "max_tokens": 200, "ignore_eos": True})
    pid = r.json()["pid"]
    http.post(f"/v1/processes/{pid}/suspend")
    chat = [{"role": "user", "content": "hi"}]
    endpoints = {
        "completions": ("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2}),
        "chat": ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 2}),
        "ollama-generate": ("/api/generate", {"model": model, "prompt": "hi", "stream": False,
                                              "options": {"num_predict": 2}}),
        "ollama-chat": ("/api/chat", {"model": model, "messages": chat, "stream": False,
                                      "options": {"num_predict": 2}}),
        "ollama-show": ("/api/show", {"model": model}),
        "spawn": ("/v1/processes", {"model": model, "prompt": "hi", "max_tokens": 2}),
        "session-create": ("/v1/sessions", {"model": model, "title": "t", "system": "s"}),
        "session-message": (f"/v1/sessions/{sid}/messages", {"content": "hi", "max_tokens": 2, "stream": False}),
        "fork": (f"/v1/processes/{pid}/fork", {"n": 1}),
        "renice": (f"/v1/processes/{pid}/renice", {"nice": 1}),
        "restore": ("/v1/hibernated/h0123456789abcdef/restore", {"model": model}),
    }
    yield server, http, endpoints
    http.close()
    server.stop()


def post(http: httpx.Client, path: str, body: bytes) -> httpx.Response:
    """POST raw bytes as JSON on a connection of its own (a request the daemon mishandles may leave its connection
    broken: the failure must show on that request, not the next); read the whole answer within TIMEOUT_S."""
    try:
        return http.post(path, content=body, headers={"content-type": "application/json", "connection": "close"})
    except httpx.TimeoutException:
        pytest.fail(f"no answer within {TIMEOUT_S} s to POST {path} {body[:200]!r}")


def check(r: httpx.Response, body: bytes, strict: bool) -> None:
    """Never a 5xx; an error is JSON with an `error`; `strict`: the body cannot be valid, so it must be a 4xx."""
    where = f"POST {r.request.url.path} {body[:300]!r} -> {r.status_code} {r.text[:300]!r}"
    assert r.status_code < 500, where
    if strict:
        assert 400 <= r.status_code < 500, where
    if r.status_code >= 400:
        try:
            payload = r.json()
        except ValueError:
            pytest.fail(f"not JSON: {where}")
        assert isinstance(payload, dict) and payload.get("error"), where


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def with_surrogates(value, key: str | None = None):
    """`value` with a lone surrogate (valid JSON as the escape \\ud800, not UTF-8 text) after every string but the
    model name."""
    if isinstance(value, dict):
        return {k: with_surrogates(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [with_surrogates(v) for v in value]
    if isinstance(value, str) and key != "model":
        return value + "\ud800"
    return value


def named_attacks(valid: dict) -> list[tuple[str, bytes]]:
    """(name, body) of hostile bodies that can never be valid requests."""
    first = next(iter(valid))
    text = json.dumps(valid)
    surrogates = with_surrogates(valid)
    return [("lone surrogates", json.dumps(surrogates).encode())] * (surrogates != valid) + [
        ("empty", b""),
        ("whitespace", b"  \n "),
        ("not json", b"model=tiny&prompt=hi"),
        ("truncated", text[: len(text) // 2].encode()),
        ("invalid utf-8", json.dumps({**valid, first: "@@"}).encode().replace(b'"@@"', b'"\xff\xfe\xc3\x28"')),
        ("NaN literal", json.dumps({**valid, first: math.nan}).encode()),
        ("Infinity literal", json.dumps({**valid, first: math.inf}).encode()),
        ("-Infinity literal", json.dumps({**valid, first: -math.inf}).encode()),
        ("deep array", nested(DEPTH).encode()),
        ("deep object", ('{"a": ' * DEPTH + "1" + "}" * DEPTH).encode()),
        ("deep field", json.dumps({**valid, first: "X"}).replace('"X"', nested(DEPTH)).encode()),
        ("unicode model", json.dumps({**valid, "model": "模型-🤖\u0000\u202e" + "ä" * 300}).encode()),
        ("array", json.dumps([valid]).encode()),
        ("string", json.dumps(text).encode()),
        ("number", b"1e308"),
        ("null", b"null"),
        ("wrong types", json.dumps({k: [{"x": None}] for k in valid}).encode()),
        ("duplicate keys", ("{" + ", ".join(f'"{k}": {json.dumps(v)}, "{k}": [1]' for k, v in valid.items()) + "}")
         .encode()),
        ("over the body limit", json.dumps({**valid, first: "a" * (MAX_BODY + 1)}).encode()),
    ]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_named_attacks_are_4xx(target, endpoint):
    server, http, endpoints = target
    path, valid = endpoints[endpoint]
    for name, body in named_attacks(valid):
        r = post(http, path, body)
        check(r, name.encode() + b": " + body, strict=True)
    assert http.get("/health").json()["status"] == "ok"


# ---- hypothesis: mutate a valid body --------------------------------------------------------------------------------

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "repetition_penalty", "seed", "n", "stop", "stop_token_ids", "logprobs", "top_logprobs", "stream",
          "stream_options", "echo", "best_of", "logit_bias", "nice", "prompt_token_ids", "content", "system", "title",
          "options", "keep_alive", "context", "raw", "format", "ignore_eos", "response_format", "tools", "suffix"]

HUGE = [2**63, 2**64, -(2**63) - 1, 2**200, -(2**200), 10**400, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf]
ODD_TEXT = ["", " ", "\u0000", "\ud800", "\udfff", "\U0010ffff", "模型", "🤖" * 50, "../../etc/passwd", "a" * 5000,
            "%s%n", "${jndi:x}", "<script>", "\r\n\r\n", "'; DROP TABLE users; --", "tiny:latest"]
BULKY = [[7] * 20_000, [-1] * 50, [2**40] * 3, ["x"] * 20, [""] * 10, {str(i): 1.0 for i in range(2_000)},
         [{"role": "user", "content": "hi"}] * 2_000, "word " * 20_000]


def leaves() -> st.SearchStrategy:
    return st.one_of(
        st.none(), st.booleans(),
        st.sampled_from(HUGE),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(ODD_TEXT),
        st.sampled_from(BULKY),
        st.text(max_size=40),
    )


def hostile_values() -> st.SearchStrategy:
    return st.recursive(leaves(), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS + ["role", "type", "text"]), inner,
                                                     max_size=4)), max_leaves=8)


@st.composite
def mutated_bodies(draw, valid: dict) -> bytes:
    body = dict(valid)
    for key in draw(st.lists(st.sampled_from(sorted(set(FIELDS) | set(valid))), min_size=1, max_size=3)):
        if draw(st.integers(0, 9)) == 0:
            body.pop(key, None)
        else:
            body[key] = draw(hostile_values())
    if "stream" in body and body["stream"] is True and draw(st.booleans()):
        body["stream"] = False
    text = json.dumps(body, allow_nan=True)  # NaN, Infinity and 10**400 go out as written
    if draw(st.integers(0, 9)) == 0:  # now and then a raw lone surrogate or control byte in the text
        text = text.replace('"hi"', draw(st.sampled_from(['"\\ud800"', '"\\udc00x"', '"\x01"', '"\\u0000"'])), 1)
    return text.encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@settings(max_examples=18, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.large_base_example, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_bodies_never_500_or_hang(target, endpoint, data):
    server, http, endpoints = target
    path, valid = endpoints[endpoint]
    body = data.draw(mutated_bodies(valid), label="body")
    r = post(http, path, body)
    check(r, body, strict=False)


def test_the_daemon_is_alive_and_no_kernel_step_failed(target):
    server, http, endpoints = target
    assert http.get("/health").json()["status"] == "ok"
    for r in server.state.models.resident.values():
        assert r.engine.steps_failed == 0, f"{r.name}: a request broke a kernel step (everyone's processes died)"
    r = http.post("/v1/completions", json={"model": server.settings.preload[0], "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
