"""A client for the llmos daemon (`llmos serve`): its address (LLMOS_HOST), the API key (LLMOS_API_KEY), one
method per endpoint the shell verbs use, and the daemon's JSON errors turned into `LlmosError`s.

Owns the HTTP side of the shell verbs. Never prints, never imports torch, and never decides between the daemon and
an in-process kernel (`llmos.cli.remote_cmd` does).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx

from llmos.errors import InvalidRequestError, LlmosError

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_PORT = 8000
DETECT_TIMEOUT_S = 2.0  # GET /health: a refused connection answers at once; this only bounds a hung listener
REQUEST_TIMEOUT = httpx.Timeout(300.0, connect=5.0)  # a request may load a model first
STREAM_TIMEOUT = httpx.Timeout(None, connect=5.0)  # a stream may be quiet for long (a suspended process)


class DaemonError(LlmosError):
    """An error the daemon answered with: `status` (HTTP), `type` (its short name) and its message."""

    def __init__(self, message: str, status: int, type: str) -> None:
        super().__init__(message)
        self.status, self.type = status, type


class DaemonUnreachableError(LlmosError):
    """No llmos daemon answers at the address the user asked for (LLMOS_HOST), or a verb needs one."""


class ConnectionLostError(Exception):
    """The daemon answered at first, then went away in the middle of a command (the CLI exits 1: not a mistake
    of the user's, and nothing they typed would fix it)."""


def daemon_url(host: str | None) -> str:
    """The base URL for an LLMOS_HOST value: `127.0.0.1:8000`, `localhost` (port 8000), `http://host:port` or
    `https://host`; None or empty -> DEFAULT_URL. Raises `InvalidRequestError` for anything else."""
    host = (host or "").strip()
    if not host:
        return DEFAULT_URL
    url = host if "://" in host else f"http://{host}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise InvalidRequestError(f"LLMOS_HOST={host!r} is not a daemon address; use HOST:PORT (127.0.0.1:8000) "
                                  "or http://HOST:PORT.")
    if port is None and "://" not in host:
        url = f"http://{parts.netloc}:{DEFAULT_PORT}"
    return url.rstrip("/")


class EventStream:
    """The server-sent events of one streaming response: iterate for the JSON of each `data:` line until
    `data: [DONE]`. `pid` is the X-Llmos-Pid header (the process the stream follows), when there is one."""

    def __init__(self, response: httpx.Response, client: DaemonClient) -> None:
        self.response, self.client = response, client
        pid = response.headers.get("x-llmos-pid")
        self.pid = int(pid) if pid and pid.isdigit() else None

    def __iter__(self) -> Iterator[dict]:
        for line in self.response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if isinstance(event, dict) and isinstance(event.get("error"), dict):  # an error after the stream began
                raise self.client.error_from(self.response.status_code, event)
            yield event


class DaemonClient:
    """The daemon at `url`, called with `key` (`Authorization: Bearer KEY`; None in single-user mode).
    `explicit`: the address came from LLMOS_HOST, so the user asked for this daemon.

    Every method raises `DaemonError` for an error answer (the daemon's message; 401 names LLMOS_API_KEY) and
    `ConnectionLostError` when the daemon cannot be reached. `transport` is for tests (an httpx transport)."""

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, explicit: bool = False,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url, self.key, self.explicit = url, key, explicit
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT, transport=transport)

    @classmethod
    def from_env(cls) -> DaemonClient:
        """The daemon named by LLMOS_HOST (default: DEFAULT_URL), with the key in LLMOS_API_KEY."""
        host = os.environ.get("LLMOS_HOST", "").strip()
        return cls(daemon_url(host), os.environ.get("LLMOS_API_KEY", "").strip() or None, explicit=bool(host))

    def close(self) -> None:
        self._http.close()

    # ---- is it there ---------------------------------------------------------------------------------

    def probe(self, timeout: float = DETECT_TIMEOUT_S) -> str | None:
        """None when an llmos daemon answers GET /health within `timeout` seconds, else why not (a few words)."""
        try:
            r = self._http.get("/health", timeout=timeout)
        except httpx.TransportError as e:
            return _why(e)
        try:
            ok = r.status_code == 200 and r.json().get("status") == "ok"
        except (ValueError, AttributeError):
            ok = False
        return None if ok else f"something else answers there (HTTP {r.status_code} on /health)"

    def detect(self, timeout: float = DETECT_TIMEOUT_S) -> bool:
        """Whether an llmos daemon answers at `url` (a short GET /health)."""
        return self.probe(timeout) is None

    def health(self) -> dict:
        """GET /health: {status, single_user, uptime_s, models: [loaded names]}."""
        return self._json("GET", "/health")

    def whoami(self) -> dict | None:
        """GET /v1/whoami: {name, role, single_user}; None when the daemon has no such endpoint."""
        return self._optional("GET", "/v1/whoami")

    # ---- processes -----------------------------------------------------------------------------------

    def spawn(self, model: str, prompt: str, params: dict, nice: int = 0, n: int = 1) -> dict:
        """POST /v1/processes without streaming: {pid, model, n, children}."""
        return self._json("POST", "/v1/processes", json={"model": model, "prompt": prompt, **params, "nice": nice,
                                                         "n": n})

    def spawn_stream(self, model: str, prompt: str, params: dict,
                     nice: int = 0) -> contextlib.AbstractContextManager[EventStream]:
        """POST /v1/processes with stream: the updates `{pid, text, token_ids, finished, finish_reason}` of the
        new process. Leaving the context early (Ctrl-C) closes the connection, and the daemon kills it."""
        return self._stream("POST", "/v1/processes", json={"model": model, "prompt": prompt, **params, "nice": nice,
                                                           "stream": True})

    def attach(self, pid: int, from_now: bool = False, new: bool = False) -> contextlib.AbstractContextManager[EventStream]:
        """GET /v1/processes/{pid}/stream: its updates from its first output token (or from now, or, with `new`,
        from the first token the daemon generated: a restored process's earlier text is not sent again);
        leaving the context leaves the process running."""
        params = {"from_now": "true"} if from_now else {"new": "true"} if new else None
        return self._stream("GET", f"/v1/processes/{pid}/stream", params=params)

    def processes(self, finished: bool = False, everyone: bool = False) -> list[dict]:
        """GET /v1/processes: the caller's live process rows (`finished`: ended ones too; `everyone`: every
        owner's, admins only)."""
        params = {"finished": str(finished).lower(), "all": str(everyone).lower()}
        return self._json("GET", "/v1/processes", params=params)["processes"]

    def process(self, pid: int) -> dict:
        """GET /v1/processes/{pid}: its row with text, output_token_ids and children."""
        return self._json("GET", f"/v1/processes/{pid}")

    def kill(self, pid: int) -> dict:
        return self._json("DELETE", f"/v1/processes/{pid}")

    def suspend(self, pid: int) -> dict:
        return self._json("POST", f"/v1/processes/{pid}/suspend")

    def resume(self, pid: int) -> dict:
        return self._json("POST", f"/v1/processes/{pid}/resume")

    def renice(self, pid: int, nice: int) -> dict:
        return self._json("POST", f"/v1/processes/{pid}/renice", json={"nice": nice})

    def fork(self, pid: int, n: int = 1) -> list[int]:
        """POST /v1/processes/{pid}/fork: the children's pids."""
        return self._json("POST", f"/v1/processes/{pid}/fork", json={"n": n})["pids"]

    def hibernate(self, pid: int) -> str:
        """POST /v1/processes/{pid}/hibernate: the image id."""
        return self._json("POST", f"/v1/processes/{pid}/hibernate")["hid"]

    def hibernated(self, owner: str | None = None) -> list[dict]:
        """GET /v1/hibernated: the caller's images (admins: `owner`'s), oldest first."""
        return self._json("GET", "/v1/hibernated", params={"owner": owner} if owner else None)["hibernated"]

    def restore(self, hid: str, model: str | None = None, owner: str | None = None) -> dict:
        """POST /v1/hibernated/{hid}/restore: {pid, model, hid}."""
        return self._json("POST", f"/v1/hibernated/{hid}/restore", json={"model": model} if model else None,
                          params={"owner": owner} if owner else None)

    def memory(self) -> dict[str, dict]:
        """GET /v1/memory: model name -> `Kernel.memory()` of each loaded model."""
        return self._json("GET", "/v1/memory")["models"]

    def kv_map(self, model: str | None = None) -> dict:
        return self._json("GET", "/v1/kv/map", params={"model": model} if model else None)

    # ---- models --------------------------------------------------------------------------------------

    def loaded_models(self) -> list[dict]:
        """The resident models, one dict each: name, bytes (weights + KV pool + swap pool; None when the daemon
        does not say), pinned, expires_in_s (None: never) and, for admins, path. From GET /v1/residency, or
        GET /api/ps, or GET /health (names only), whichever the daemon has."""
        residency = self._optional("GET", "/v1/residency")
        if residency is not None:
            return residency["data"]
        ollama = self._optional("GET", "/api/ps")
        if ollama is not None:
            return [{"name": m["name"], "bytes": m.get("size"), "pinned": False, "expires_in_s": None}
                    for m in ollama["models"]]
        return [{"name": name, "bytes": None, "pinned": False, "expires_in_s": None}
                for name in self.health().get("models", [])]

    def load_model(self, name: str) -> dict:
        return self._json("POST", f"/v1/models/{name}/load")

    def unload_model(self, name: str) -> dict:
        return self._json("POST", f"/v1/models/{name}/unload")

    def pin_model(self, name: str, pinned: bool = True) -> dict:
        return self._json("POST", f"/v1/models/{name}/pin", json={"pinned": pinned})

    # ---- sessions ------------------------------------------------------------------------------------

    def create_session(self, model: str, system: str | None = None, title: str | None = None) -> dict:
        """POST /v1/sessions: {id, model, title, created}."""
        return self._json("POST", "/v1/sessions", json={"model": model, "system": system, "title": title})

    def sessions(self) -> list[dict]:
        return self._json("GET", "/v1/sessions")["sessions"]

    def session(self, sid: str) -> dict:
        return self._json("GET", f"/v1/sessions/{sid}")

    def delete_session(self, sid: str) -> dict:
        return self._json("DELETE", f"/v1/sessions/{sid}")

    def send_message(self, sid: str, content: str, params: dict) -> contextlib.AbstractContextManager[EventStream]:
        """POST /v1/sessions/{sid}/messages, streamed: the reply's updates, then one event with `message`,
        `finish_reason`, `stored` and `usage`. Leaving early kills the reply (the history keeps neither message)."""
        return self._stream("POST", f"/v1/sessions/{sid}/messages", json={"content": content, **params,
                                                                           "stream": True})

    # ---- training jobs ---------------------------------------------------------------------------------

    def submit_job(self, config: dict) -> dict:
        """POST /v1/jobs: the new job's row ({id: "j3", state, ...})."""
        return self._json("POST", "/v1/jobs", json={"config": config})

    def jobs(self, finished: bool = False, everyone: bool = False) -> list[dict] | None:
        """GET /v1/jobs: the caller's live job rows (`finished`: ended ones too; `everyone`: every owner's, admins
        only); None when the daemon has no jobs."""
        got = self._optional("GET", "/v1/jobs", params={"finished": str(finished).lower(),
                                                         "all": str(everyone).lower()})
        return None if got is None else got["jobs"]

    def job(self, job: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job}")

    def suspend_job(self, job: str) -> dict:
        """POST /v1/jobs/{job}/suspend: returns once the job has checkpointed and stopped."""
        return self._json("POST", f"/v1/jobs/{job}/suspend", timeout=STREAM_TIMEOUT)

    def resume_job(self, job: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job}/resume")

    def kill_job(self, job: str) -> dict:
        return self._json("DELETE", f"/v1/jobs/{job}")

    def job_log(self, job: str, follow: bool = False) -> contextlib.AbstractContextManager[httpx.Response]:
        """GET /v1/jobs/{job}/log: a streamed text response (iterate `iter_bytes()`); with `follow` it lasts
        while the job is queued or running."""
        return self._raw_stream("GET", f"/v1/jobs/{job}/log", params={"follow": str(follow).lower()})

    # ---- plumbing ------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            return self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise self.lost(e) from None

    def _json(self, method: str, path: str, **kw) -> dict:
        r = self._send(method, path, **kw)
        if r.status_code >= 400:
            raise self.error(r)
        return r.json()

    def _optional(self, method: str, path: str, **kw) -> dict | None:
        """`_json`, but None when the daemon has no such endpoint (an older daemon, or a router not built yet)."""
        r = self._send(method, path, **kw)
        if r.status_code in (404, 405) and _error_type(r) in ("not_found", "method_not_allowed", None):
            return None
        if r.status_code >= 400:
            raise self.error(r)
        return r.json()

    @contextlib.contextmanager
    def _stream(self, method: str, path: str, **kw) -> Iterator[EventStream]:
        with self._raw_stream(method, path, **kw) as r:
            yield EventStream(r, self)

    @contextlib.contextmanager
    def _raw_stream(self, method: str, path: str, **kw) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(method, path, timeout=STREAM_TIMEOUT, **kw) as r:
                if r.status_code >= 400:
                    r.read()
                    raise self.error(r)
                yield r
        except httpx.TransportError as e:
            raise self.lost(e) from None

    def error(self, r: httpx.Response) -> DaemonError:
        """The `DaemonError` for an error response (its JSON body, or its status when it has none)."""
        try:
            body = r.json()
        except ValueError:
            body = None
        return self.error_from(r.status_code, body if isinstance(body, dict) else {})

    def error_from(self, status: int, body: dict) -> DaemonError:
        e = body.get("error")
        if isinstance(e, dict):
            type, message = str(e.get("type") or "error"), str(e.get("message") or "")
        else:  # Ollama-style {"error": "..."} or no JSON at all
            type, message = str(body.get("type") or "error"), str(e or "")
        if status == 401:
            if self.key is None:
                message = (f"the llmos daemon at {self.url} needs an API key: set LLMOS_API_KEY to yours (an admin "
                           "creates one with `llmos user key NAME`).")
            else:
                message = (f"the llmos daemon at {self.url} refused the key in LLMOS_API_KEY "
                           f"({message.rstrip('.') or 'invalid'}).")
        elif status >= 500:
            message = f"the llmos daemon at {self.url} failed: {message or f'HTTP {status}'}"
        elif not message:
            message = f"the llmos daemon at {self.url} answered HTTP {status}."
        return DaemonError(message, status, type)

    def lost(self, e: httpx.TransportError) -> ConnectionLostError:
        return ConnectionLostError(f"lost the llmos daemon at {self.url} ({_why(e)}); is it still running? "
                                   "(`llmos serve` starts one)")


def _why(e: httpx.TransportError) -> str:
    """A few words for a transport error."""
    if isinstance(e, httpx.TimeoutException):
        return "no answer in time"
    text = str(e).lower()
    if isinstance(e, httpx.ConnectError):
        if "refused" in text:
            return "connection refused"
        if "name or service" in text or "nodename" in text or "getaddrinfo" in text:
            return "unknown host name"
        return str(e) or "cannot connect"
    if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError)):
        return "it closed the connection"
    return str(e) or type(e).__name__


def _error_type(r: httpx.Response) -> str | None:
    try:
        e = r.json().get("error")
    except (ValueError, AttributeError):
        return None
    return e.get("type") if isinstance(e, dict) else None
