"""The shell verbs against a real daemon (uvicorn on a free port, in this process): `run` streams the greedy text
that `run --local` computes; `run --hibernate-after` and `resume HID` on the daemon make one straight run; ps,
suspend, nice, resume, fork, hibernate and kill round trip on a long process; chat keeps a session there; `models`
shows what is loaded; top draws frames; Ctrl-C kills the remote process. Without a daemon the verbs run in-process
(or refuse, one line, exit 2), an explicit LLMOS_HOST that does not answer is an error, a daemon with users wants
LLMOS_API_KEY, and a daemon that goes away mid-command is one line and exit 1.
"""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmos.cli import client as client_module
from llmos.cli import main as cli
from llmos.cli.client import DaemonClient, daemon_url
from llmos.errors import InvalidRequestError

PROMPT = "In the beginning God created"
GREEDY = ["--temperature", "0", "--ignore-eos", "--max-tokens", "12"]
HID = re.compile(r"h[0-9a-f]{10}")
runner = CliRunner()


def server_helpers():
    """tests/server/conftest.py (start_server, free_port), loaded by path: tests is not a package."""
    path = Path(__file__).resolve().parents[1] / "server" / "conftest.py"
    spec = importlib.util.spec_from_file_location("llmos_server_test_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = server_helpers()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("llmos-home")
    mp.setenv("LLMOS_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model_factory):
    """The tiny Llama with a 2048-token context, so that a process can run long enough to be acted on."""
    return model_factory(tmp_path_factory.mktemp("long-llama"), max_positions=2048)


@pytest.fixture(scope="module")
def daemon(home, model_dir):
    """A single-user daemon serving `model_dir` under its directory name."""
    s = helpers.start_server(model_dir)
    yield s
    s.stop()


@pytest.fixture
def api(daemon):
    c = DaemonClient(daemon.url)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def env(monkeypatch, request):
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.delenv("LLMOS_API_KEY", raising=False)
    monkeypatch.delenv("LLMOS_HOST", raising=False)
    if "daemon" in request.fixturenames:
        monkeypatch.setenv("LLMOS_HOST", request.getfixturevalue("daemon").url)


def llmos(*args, input=None):
    return runner.invoke(cli.app, [str(a) for a in args], input=input)


def stdout(result) -> str:
    return result.stdout_bytes.decode("utf-8")


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    return result


def assert_one_line_error(result, code, *words):
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def ps_rows(text: str) -> dict[int, list[str]]:
    rows = {}
    for line in text.splitlines():
        cols = line.split()
        if cols and cols[0].isdigit() and len(cols) >= 12:
            rows[int(cols[0])] = cols
    return rows


def long_process(api, model_dir) -> int:
    """A process that would run for ~2000 tokens, suspended at once (so the verbs act on a live process)."""
    pid = api.spawn(model_dir.name, PROMPT, {"max_tokens": 2000, "temperature": 0, "ignore_eos": True})["pid"]
    api.suspend(pid)
    return pid


# ---- run and resume ----------------------------------------------------------------------------------


def test_run_on_the_daemon_streams_the_text_of_run_local(daemon, model_dir):
    remote = ok(llmos("run", PROMPT, "--model", model_dir, *GREEDY))
    local = ok(llmos("run", PROMPT, "--model", model_dir, *GREEDY, "--local"))
    assert stdout(remote) == stdout(local) and len(stdout(remote)) > 1
    assert remote.stderr.startswith(f"(daemon at {daemon.url})\n")
    assert "12 output tokens" in remote.stderr and "finish: length" in remote.stderr
    assert local.stderr.startswith("(--local: running in-process)\n")


def test_run_hibernate_after_and_resume_on_the_daemon_make_one_straight_run(daemon, model_dir):
    longer = [*GREEDY[:-1], "200"]  # long enough that the daemon cannot finish before the hibernate request lands
    straight = stdout(ok(llmos("run", PROMPT, "--model", model_dir, *longer, "--no-stats", "--local")))
    first = ok(llmos("run", PROMPT, "--model", model_dir, *longer, "--hibernate-after", "4"))
    hid = HID.search(first.stderr).group(0)
    assert f"hibernated as {hid}; continue with: llmos resume {hid}" in first.stderr
    listed = ok(llmos("ps"))
    assert hid in listed.stdout and model_dir.name in listed.stdout
    second = ok(llmos("resume", hid))
    assert stdout(first) + stdout(second) == straight
    assert f"resumed {hid} as pid" in second.stderr and "(200 in all)" in second.stderr
    assert_one_line_error(llmos("resume", hid), 2, f"no hibernated process {hid}")


def test_ctrl_c_kills_the_process_on_the_daemon(daemon, model_dir, api):
    env = {**os.environ, "LLMOS_HOST": daemon.url}
    run = subprocess.Popen([sys.executable, "-m", "llmos.cli.main", "run", PROMPT, "--model", str(model_dir),
                            "--max-tokens", "2000", "--ignore-eos", "-t", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if we inherited it ignored
    try:
        assert run.stdout.read(1), "run wrote nothing"
        pid = max(p["pid"] for p in api.processes())
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130 and b"Traceback" not in stderr
    deadline = time.monotonic() + 10
    while api.process(pid)["state"] != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.process(pid)["state"] == "KILLED"


# ---- the process verbs ----------------------------------------------------------------------------------


def test_ps_suspend_nice_resume_fork_hibernate_kill_round_trip(daemon, model_dir, api):
    pid, other = long_process(api, model_dir), long_process(api, model_dir)
    api.resume(pid)
    ok(llmos("suspend", pid))
    ok(llmos("nice", pid, "-5"))
    listed = ok(llmos("ps"))
    assert listed.stderr.startswith(f"(daemon at {daemon.url})")
    row = ps_rows(listed.stdout)[pid]
    assert row[2] == "suspended" and row[3] == "-5"
    assert ps_rows(listed.stdout)[other][2] == "suspended"

    hibernated = ok(llmos("hibernate", other))
    hid = hibernated.stdout.strip()
    assert HID.fullmatch(hid) and hid in ok(llmos("ps")).stdout
    assert api.process(other)["state"] == "HIBERNATED"

    ok(llmos("resume", pid))
    forked = ok(llmos("fork", pid, "2"))
    children = [int(c) for c in forked.stdout.split()]
    assert len(children) == 2 and all(api.process(c)["parent"] == pid for c in children)
    for p in (pid, *children):
        ok(llmos("kill", p))
        assert api.process(p)["state"] in ("KILLED", "FINISHED")
    assert pid not in ps_rows(ok(llmos("ps")).stdout)
    assert pid in ps_rows(ok(llmos("ps", "-a")).stdout)

    assert_one_line_error(llmos("kill", 99999), 2, "no process with pid 99999")
    assert_one_line_error(llmos("nice", pid + 1000, "99"), 2)
    restored = ok(llmos("resume", hid, "--hibernate-after", "1"))  # comes back and goes to disk again
    assert HID.search(restored.stderr).group(0) != hid


def test_top_draws_frames_of_the_daemon(daemon, model_dir, api):
    pid = long_process(api, model_dir)
    try:
        done = ok(llmos("top", "--iterations", "2", "--interval", "0"))
    finally:
        api.kill(pid)
    assert done.stdout.count("llmos top - daemon at") == 2
    assert f"model {model_dir.name}" in done.stdout and "KV pool" in done.stdout
    assert ps_rows(done.stdout)[pid][2] == "suspended"


# ---- chat and models -------------------------------------------------------------------------------------


def test_chat_on_the_daemon_keeps_a_session_and_reset_starts_another(daemon, model_dir, api):
    before = {s["id"] for s in api.sessions()}
    chat = ok(llmos("chat", "-m", model_dir, "-t", "0", "--max-tokens", "6", "--ignore-eos",
                    input="hello\n/reset\nhello\n/exit\nnever read\n"))
    first, second = stdout(chat).split("\n")[:2]
    assert first == second and first  # greedy, each in a fresh session
    new = [s for s in api.sessions() if s["id"] not in before]
    assert len(new) == 2 and all(s["messages"] == 2 and s["model"] == model_dir.name for s in new)
    assert all(s["id"] in chat.stderr for s in new) and "conversation cleared" in chat.stderr


def test_models_shows_which_are_loaded_and_their_memory(daemon, model_dir):
    listing = ok(llmos("models"))
    row = next(line.split() for line in listing.stdout.splitlines() if line.split()[:1] == [model_dir.name])
    assert row[-3] == "yes" and row[-1] in ("kB", "MB", "GB")  # loaded, memory "35.2 MB"
    assert "loaded" in listing.stdout.splitlines()[0]
    default = next(line.split() for line in listing.stdout.splitlines() if line.split()[:1] == ["default"])
    assert default[-2:] == ["no", "-"]
    ok(llmos("models", "add", model_dir, "--name", "longer"))  # the same directory, now by its registered name
    listing = ok(llmos("models"))
    assert not any(line.split()[:1] == [model_dir.name] for line in listing.stdout.splitlines())
    assert next(line.split() for line in listing.stdout.splitlines() if line.split()[:1] == ["longer"])[-3] == "yes"
    assert "loaded" not in ok(llmos("models", "--local")).stdout
    ok(llmos("models", "rm", "longer"))


# ---- without a daemon, and errors --------------------------------------------------------------------------


@pytest.fixture
def nowhere(monkeypatch) -> str:
    """The URL of a loopback port with nothing listening, made the default address."""
    url = f"http://127.0.0.1:{helpers.free_port()}"
    monkeypatch.setattr(client_module, "DEFAULT_URL", url)
    return url


def test_without_a_daemon_the_verbs_run_in_process_or_refuse(home, model_dir, nowhere):
    done = ok(llmos("run", PROMPT, "--model", model_dir, *GREEDY))
    assert done.stderr.startswith(f"(no daemon at {nowhere}: running in-process)\n")
    assert "finish: length" in done.stderr
    listed = ok(llmos("ps"))
    assert f"no daemon at {nowhere}" in listed.stderr and "llmos sh" in listed.stderr
    for verb in (["kill", "1"], ["suspend", "1"], ["resume", "1"], ["hibernate", "1"], ["nice", "1", "-3"],
                 ["fork", "1"]):
        assert_one_line_error(llmos(*verb), 2, f"no llmos daemon at {nowhere}; start one with `llmos serve`",
                              "llmos sh")
    assert_one_line_error(llmos("top", "--iterations", "1"), 2, "no live kernel", "llmos sh")
    assert_one_line_error(llmos("run", "hi", "--top-p", "1.5"), 2, "top_p")  # checked before anything else


def test_an_explicit_llmos_host_that_does_not_answer_is_an_error(home, model_dir, nowhere, monkeypatch):
    monkeypatch.setenv("LLMOS_HOST", nowhere.removeprefix("http://"))
    assert_one_line_error(llmos("run", PROMPT, "--model", model_dir), 2, f"no llmos daemon at {nowhere}",
                          "LLMOS_HOST", "--local")
    assert_one_line_error(llmos("ps"), 2, "LLMOS_HOST")
    assert ok(llmos("run", PROMPT, "--model", model_dir, *GREEDY, "--local")).stderr.startswith("(--local")
    monkeypatch.setenv("LLMOS_HOST", "http://host:port/x")
    assert_one_line_error(llmos("ps"), 2, "LLMOS_HOST", "not a daemon address")


def test_a_daemon_that_goes_away_mid_command_is_one_line_and_exit_1(home, nowhere, monkeypatch):
    monkeypatch.setattr(DaemonClient, "probe", lambda self, timeout=None: None)  # "answered", then gone
    assert_one_line_error(llmos("kill", "1"), 1, f"lost the llmos daemon at {nowhere}", "connection refused")
    assert_one_line_error(llmos("run", "hi"), 1, "lost the llmos daemon")


def test_a_daemon_with_users_wants_llmos_api_key(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "keyed-home"))
    from llmos.fs.users import UserStore

    users = UserStore()
    users.add_user("ada", "admin")
    key = users.create_key("ada")
    keyed = helpers.start_server(model_dir)
    try:
        monkeypatch.setenv("LLMOS_HOST", keyed.url)
        assert_one_line_error(llmos("ps"), 2, "LLMOS_API_KEY", keyed.url)
        assert_one_line_error(llmos("run", PROMPT, "--model", model_dir), 2, "LLMOS_API_KEY")
        monkeypatch.setenv("LLMOS_API_KEY", "sk-llmos-00000000-wrong")
        assert_one_line_error(llmos("ps"), 2, "refused the key in LLMOS_API_KEY")
        monkeypatch.setenv("LLMOS_API_KEY", key)
        assert stdout(ok(llmos("run", PROMPT, "--model", model_dir, *GREEDY))).strip()
    finally:
        keyed.stop()


@pytest.mark.parametrize("host, url", [
    (None, "http://127.0.0.1:8000"), ("", "http://127.0.0.1:8000"), ("127.0.0.1:9000", "http://127.0.0.1:9000"),
    ("localhost", "http://localhost:8000"), ("http://example.org:81/", "http://example.org:81"),
    ("https://example.org", "https://example.org"), ("[::1]:8001", "http://[::1]:8001"),
])
def test_daemon_url(host, url):
    assert daemon_url(host) == url


@pytest.mark.parametrize("host", ["ftp://x:1", "http://", "x:notaport", "http://x:1/path", "http://x?y=1"])
def test_daemon_url_rejects_what_is_not_an_address(host):
    with pytest.raises(InvalidRequestError, match="LLMOS_HOST"):
        daemon_url(host)


def test_follow_writes_every_update_and_hibernates_after_n(capsys):
    from llmos.cli.remote_cmd import follow

    events = [{"text": "ab", "token_ids": [1, 2], "finished": False},
              {"text": "c", "token_ids": [3], "finished": True, "finish_reason": "length"}]
    done = follow(None, events, 7)
    assert capsys.readouterr().out == "abc"
    assert done.token_ids == [1, 2, 3] and done.finish_reason == "length" and done.hid is None
