"""The daemon's core: start-up in single-user mode, /health, the JSON error format, the body limit, and the
model manager (load on demand, unload, pin, keep-alive)."""

from __future__ import annotations

import time

import httpx
import pytest

from llmos.errors import InvalidRequestError, ModelLoadError
from llmos.kernel.kernel import KernelConfig
from llmos.server.models import ModelManager


def test_health_and_single_user_mode(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["single_user"] is True
    assert server.settings.preload[0] in body["models"]


def test_unknown_route_is_a_json_404(server):
    r = httpx.get(server.url + "/no/such/thing")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found"


def test_oversized_body_is_413_json(server):
    r = httpx.post(server.url + "/health", content=b"x" * (server.settings.max_body_bytes + 1),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "request_too_large"


def test_model_manager_loads_unloads_pins_and_expires(tiny_model_dir, llmos_home):
    mm = ModelManager(KernelConfig(kv_memory="8MiB", swap_memory=0), keep_alive_s=0.5,
                      extra={"t": tiny_model_dir})
    try:
        with pytest.raises(ModelLoadError, match="not found"):
            mm.get("nope")
        r = mm.get("t")
        assert [m["name"] for m in mm.loaded()] == ["t"] and r.nbytes > 0
        deadline = time.monotonic() + 10
        while mm.loaded() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert mm.loaded() == [], "an idle model unloads after its keep-alive"
        mm.pin("t")
        time.sleep(1.5)
        assert [m["name"] for m in mm.loaded()] == ["t"], "a pinned model stays"
        assert mm.unload("t") and not mm.unload("t")
        small = ModelManager(KernelConfig(kv_memory="8MiB", swap_memory=0), memory_budget=1024,
                             extra={"t": tiny_model_dir})
        with pytest.raises(InvalidRequestError, match="memory budget"):
            small.get("t")
        small.shutdown()
    finally:
        mm.shutdown()


def test_metrics_after_a_generation(server):
    from llmos.model.sampling import SamplingParams
    r = server.state.models.get(server.settings.preload[0])
    p = r.kernel.spawn([5, 6, 7, 8], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), owner="local")
    r.engine.wake()
    deadline = time.monotonic() + 20
    while not p.is_finished and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    text = httpx.get(server.url + "/metrics").text
    model = server.settings.preload[0]
    assert f'llmos_kv_blocks{{model="{model}",state="used"}}' in text
    assert "llmos_queue_depth" in text and "llmos_running_processes" in text
    assert f'llmos_generated_tokens_total{{model="{model}",owner="local"}}' in text
    assert f'llmos_time_to_first_token_seconds_count{{model="{model}"}}' in text
    assert "llmos_inter_token_latency_seconds_bucket" in text


def test_a_json_body_without_a_json_content_type_is_read_as_json(server):
    model = server.settings.preload[0]
    for ctype in (None, "application/x-www-form-urlencoded", "text/plain"):
        headers = {"content-type": ctype} if ctype else {}
        r = httpx.post(server.url + "/v1/completions", headers=headers,
                       content=b'{"model": "%s", "prompt": "hi", "max_tokens": 2}' % model.encode())
        assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/completions", content=b"model=x&prompt=y",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_cross_origin_and_rebound_host_requests_are_refused(server):
    body = {"model": server.settings.preload[0], "prompt": "hi", "max_tokens": 1}
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"{}", headers={"host": "evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    own = server.url.removeprefix("http://")
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"origin": f"http://{own}"})
    assert r.status_code == 200


def test_binding_to_every_interface_is_not_loopback():
    from llmos.server.app import is_loopback
    assert not is_loopback("") and not is_loopback("0.0.0.0") and not is_loopback("::")
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")


def test_unloading_a_model_ends_its_streams(server):
    """Unload (desktop button, Ollama keep_alive 0) kills the model's processes and their streams end."""
    import threading
    model = server.settings.preload[0]
    r = server.state.models.get(model)
    r.engine.step_hooks.append(lambda kernel, tokens: time.sleep(0.02))  # slow enough to unload mid-stream
    got: dict = {}

    def stream():
        with httpx.stream("POST", server.url + "/v1/processes", timeout=30,
                          json={"model": model, "prompt": "hello", "max_tokens": 200, "ignore_eos": True,
                                "stream": True}) as resp:
            got["lines"] = [line for line in resp.iter_lines() if line]
    t = threading.Thread(target=stream)
    t.start()
    time.sleep(1.0)
    assert httpx.post(server.url + f"/v1/models/{model}/unload", timeout=30).status_code == 200
    t.join(20)
    assert not t.is_alive(), "the stream must end when its model is unloaded"
    assert got["lines"][-1] == "data: [DONE]"
    server.state.models.get(model)  # load it again for the other tests
