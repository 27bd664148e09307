"""A real daemon for the server tests: uvicorn on a free loopback port in a background thread, LLMOS_HOME in a
temporary directory, the tiny test model served as "tiny"."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from llmos.kernel.kernel import KernelConfig
from llmos.server.app import ServerSettings, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A uvicorn server in a thread. `url` is its base address; `app` the FastAPI app; `state` its ServerState."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.state = self.app.state.llmos
        self.url = f"http://127.0.0.1:{settings.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError("the test daemon did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(model_dir, **kw) -> RunningServer:
    kernel = kw.pop("kernel", None) or KernelConfig(kv_memory="64MiB", swap_memory="16MiB", policy="fair")
    settings = ServerSettings(port=free_port(), models=[model_dir], preload=[model_dir.name], kernel=kernel, **kw)
    return RunningServer(settings).start()


@pytest.fixture(scope="module")
def llmos_home(tmp_path_factory, monkeypatch_module):
    home = tmp_path_factory.mktemp("llmos-home")
    monkeypatch_module.setenv("LLMOS_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def server(tiny_model_dir, llmos_home):
    """A single-user daemon (no users configured) serving the tiny model as its directory name."""
    s = start_server(tiny_model_dir)
    yield s
    s.stop()
