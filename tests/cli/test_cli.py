"""The shell end to end on a tiny model: `run` streams what the kernel computes, prompt sources, chat over piped
stdin, the model registry commands, and every bad input exits 2 with one clear line and nothing changed on disk.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmos.cli import main as cli
from llmos.fs import default_model_dir
from llmos.kernel import syscalls
from llmos.kernel.kernel import Kernel, KernelConfig
from llmos.model.config import ModelConfig
from llmos.model.sampling import SamplingParams
from llmos.model.tokenizer import Tokenizer

PROMPT = "In the beginning God created"
GREEDY = ["--temperature", "0", "--ignore-eos", "--max-tokens", "12"]
runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "250")  # keep rich tables on one line per row
    return tmp_path / "home"


def llmos(*args, input=None):
    return runner.invoke(cli.app, [str(a) for a in args], input=input)


def subprocess_llmos(*args, **kwargs):
    env = {**os.environ, "COLUMNS": "250"}
    done = subprocess.run([sys.executable, "-m", "llmos.cli.main", *map(str, args)], capture_output=True,
                          timeout=120, env=env, **kwargs)
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()  # bytes: keep "\r" as written
    return done


def stdout(result) -> str:
    """stdout exactly as written (`result.stdout` turns "\\r\\n" into "\\n")."""
    return result.stdout_bytes.decode("utf-8")


def kernel_text(model_dir, prompt, **params):
    kernel = Kernel(model_dir, KernelConfig(kv_memory="64MiB"))
    return syscalls.wait(kernel, syscalls.spawn(kernel, prompt, SamplingParams(**params))).text


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def assert_user_error(result, *words):
    """Exit 2, one `error: ...` line on stderr naming the problem, no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


# ---- run ---------------------------------------------------------------------------------------


def test_run_greedy_output_equals_kernel_wait(tiny_model_dir):
    result = llmos("run", PROMPT, "--model", tiny_model_dir, *GREEDY)
    assert result.exit_code == 0, result.output
    expected = kernel_text(tiny_model_dir, PROMPT, max_tokens=12, temperature=0, top_p=0.95, ignore_eos=True)
    assert stdout(result) == expected + "\n"
    for part in ("prompt tokens", "12 output tokens", "TTFT", "tokens/s", "finish: length"):
        assert part in result.stderr


def test_run_flushes_each_delta_before_generating_the_next(tiny_model_dir, monkeypatch):
    real_stream, deltas = syscalls.stream, []

    def spy(kernel, pid, owner="local"):
        for delta in real_stream(kernel, pid, owner):
            assert sys.stdout.buffer.getvalue().decode() == "".join(deltas)  # the previous one is already out
            deltas.append(delta)
            yield delta

    monkeypatch.setattr(syscalls, "stream", spy)
    result = llmos("run", PROMPT, "--model", tiny_model_dir, "--no-stats", *GREEDY)
    assert result.exit_code == 0 and len(deltas) > 1
    assert stdout(result) == "".join(deltas) + "\n" and result.stderr == ""


def test_run_reads_the_prompt_from_stdin_and_from_a_file(tiny_model_dir, tmp_path):
    prompt = "您好，欢迎 🤖 The quick brown fox"
    from_arg = llmos("run", prompt, "-m", tiny_model_dir, *GREEDY)
    from_stdin = llmos("run", "-", "-m", tiny_model_dir, *GREEDY, input=prompt.encode())
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    from_file = llmos("run", "--prompt-file", tmp_path / "prompt.txt", "-m", tiny_model_dir, *GREEDY)
    assert from_arg.exit_code == from_stdin.exit_code == from_file.exit_code == 0
    assert stdout(from_arg) == stdout(from_stdin) == stdout(from_file)


def test_run_seed_makes_sampling_reproducible(tiny_model_dir):
    args = ["run", PROMPT, "-m", tiny_model_dir, "--temperature", "1.0", "--seed", "7", "--max-tokens", "10"]
    assert stdout(llmos(*args)) == stdout(llmos(*args))


def test_run_without_model_uses_the_bundled_default():
    assert (default_model_dir() / "config.json").is_file(), "the bundled default model must ship with llmos"
    result = llmos("run", "Once upon a time", "--max-tokens", "8", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert "8 output tokens" in result.stderr or "finish: stop" in result.stderr


# ---- run: bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--temperature=-1"], ["temperature", ">= 0"]),
    (["--top-p", "0"], ["top_p", "(0, 1]"]),
    (["--top-p", "1.5"], ["top_p", "(0, 1]"]),
    (["--max-tokens", "0"], ["max_tokens", ">= 1"]),
    (["--kv-memory", "lots"], ["memory budget", "lots"]),
    (["--device", "nonsense"], ["device", "nonsense"]),
])
def test_run_rejects_bad_parameters(tiny_model_dir, args, words):
    assert_user_error(llmos("run", PROMPT, "-m", tiny_model_dir, *args), *words)


def test_run_rejects_an_out_of_range_seed_as_a_usage_error(tiny_model_dir):
    result = llmos("run", PROMPT, "-m", tiny_model_dir, "--seed", str(2**64))
    assert result.exit_code == 2 and "--seed" in result.stderr and "Traceback" not in result.output


def test_run_rejects_bad_prompts(tiny_model_dir, tmp_path):
    model = ["-m", tiny_model_dir]
    assert_user_error(llmos("run", *model), "no prompt given", "--prompt-file")
    assert_user_error(llmos("run", "", *model), "prompt is empty")
    assert_user_error(llmos("run", "-", *model, input=b""), "prompt is empty")
    assert_user_error(llmos("run", "word " * 400, *model), "context window of 256 tokens", "shorten")
    assert_user_error(llmos("run", "hi", "--prompt-file", tmp_path / "x.txt", *model), "not both")


def test_run_rejects_bad_prompt_files(tiny_model_dir, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    before = tree_hash(tmp_path)
    assert_user_error(llmos("run", "-f", latin1, "-m", tiny_model_dir), str(latin1), "not UTF-8", "0xe9")
    assert_user_error(llmos("run", "-f", tmp_path / "missing.txt", "-m", tiny_model_dir), "missing.txt",
                      "does not exist")
    assert_user_error(llmos("run", "-f", tmp_path, "-m", tiny_model_dir), "is a directory")
    assert tree_hash(tmp_path) == before


def broken_copy(tiny_model_dir, tmp_path, how):
    d = tmp_path / f"broken-{how}"
    shutil.copytree(tiny_model_dir, d)
    config = json.loads((d / "config.json").read_text())
    if how == "mamba":
        config["model_type"] = "mamba"
    elif how == "shapes":
        config["intermediate_size"] = 96
    elif how == "truncated":
        weights = d / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("how, words", [
    ("mamba", ["'mamba'", "not supported"]),
    ("truncated", ["model.safetensors", "corrupt or truncated"]),
    ("shapes", ["shape", "config.json"]),
])
def test_run_rejects_broken_models_and_leaves_them_unchanged(tiny_model_dir, tmp_path, home, how, words):
    d = broken_copy(tiny_model_dir, tmp_path, how)
    before = tree_hash(d)
    assert_user_error(llmos("run", PROMPT, "--model", d), *words)
    assert tree_hash(d) == before
    assert not home.exists()


def test_run_rejects_a_missing_model_directory(tmp_path, home):
    assert_user_error(llmos("run", PROMPT, "--model", tmp_path / "nope"), str(tmp_path / "nope"), "does not exist")
    assert_user_error(llmos("run", PROMPT, "--model", "nope"), "'nope'", "llmos models")
    assert not home.exists()


# ---- chat --------------------------------------------------------------------------------------

CHAT = ["--temperature", "0", "--ignore-eos", "--max-tokens", "8", "--stop", "\n"]


@pytest.fixture
def spawned(monkeypatch):
    """The decoded prompts `chat` spawns, in order."""
    real_spawn, prompts = syscalls.spawn, []

    def spy(kernel, prompt, params=None, owner="local"):
        prompts.append(kernel.tokenizer.decode(prompt) if isinstance(prompt, list) else prompt)
        return real_spawn(kernel, prompt, params, owner)

    monkeypatch.setattr(syscalls, "spawn", spy)
    return prompts


def test_chat_over_piped_stdin_keeps_history_and_resets(tiny_model_dir, spawned):
    lines = "hello\nagain\n/help\n/reset\nhello\n/exit\nnever read\n"
    result = llmos("chat", "-m", tiny_model_dir, *CHAT, input=lines)
    assert result.exit_code == 0, result.output
    out = stdout(result).split("\n")
    first, second, reset_reply = out[0], out[1], out[2]  # piped: stdout holds the replies only
    assert cli.CHAT_HELP.split("\n")[0] in result.stderr
    assert reset_reply == first  # same conversation after /reset, greedy: same reply
    assert spawned == ["User: hello\nAssistant:", f"User: hello\nAssistant: {first.strip()}\nUser: again\nAssistant:",
                       "User: hello\nAssistant:"]
    assert "conversation cleared" in result.stderr and "Traceback" not in result.output


def test_chat_uses_the_models_chat_template_and_system_message(tiny_model_dir, tmp_path, spawned, monkeypatch):
    d = tmp_path / "chatty"
    shutil.copytree(tiny_model_dir, d)
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    real_spawn, ids = syscalls.spawn, []
    monkeypatch.setattr(syscalls, "spawn", lambda k, p, *a: ids.append(p) or real_spawn(k, p, *a))
    result = llmos("chat", "-m", d, "--system", "Be brief.", *CHAT, input="hi\n")
    assert result.exit_code == 0, result.output
    rendered = "<|system|>Be brief.\n<|user|>hi\n<|assistant|>"
    assert ids == [Tokenizer.from_dir(d).encode(rendered, add_special_tokens=False)]
    assert "its chat template" in result.stderr


def test_chat_drops_the_oldest_turns_when_the_context_fills(tiny_model_dir, spawned):
    message = "the quick brown fox jumps over the lazy dog " * 6
    result = llmos("chat", "-m", tiny_model_dir, *CHAT, input=f"{message}\n" * 5)
    assert result.exit_code == 0, result.output
    assert "dropped the" in result.stderr and "oldest turn" in result.stderr
    assert len(spawned) == 5 and spawned[-1].count("User:") < 5  # older turns gone
    assert spawned[-1].endswith(f"User: {message}\nAssistant:")  # the newest kept


def test_chat_reports_a_too_long_message_and_goes_on(tiny_model_dir, spawned):
    result = llmos("chat", "-m", tiny_model_dir, *CHAT, input=f"{'word ' * 400}\nhello\n")
    assert result.exit_code == 0, result.output
    assert "context window of 256 tokens" in result.stderr and "Traceback" not in result.output
    assert spawned[-1] == "User: hello\nAssistant:"  # the failed message did not stay in the history


def test_chat_rejects_bad_parameters_and_models(tiny_model_dir, tmp_path):
    assert_user_error(llmos("chat", "-m", tiny_model_dir, "--top-p", "1.5", input="hi\n"), "top_p")
    assert_user_error(llmos("chat", "-m", tmp_path / "nope", input="hi\n"), "does not exist")


# ---- models ------------------------------------------------------------------------------------


def test_models_add_list_run_by_name_rm(tiny_model_dir, tmp_path):
    d = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, d)
    added = llmos("models", "add", d, "--name", "tiny-llama")
    assert added.exit_code == 0 and "tiny-llama" in added.stdout
    listing = llmos("models")
    assert listing.exit_code == 0, listing.output
    row = next(line for line in listing.stdout.splitlines() if line.strip().startswith("tiny-llama"))
    params = cli.human_count(ModelConfig.from_dir(d).num_parameters())
    assert "llama" in row and params in row and str(d) in row and "kB" in row
    assert any(line.strip().startswith("default") for line in listing.stdout.splitlines())
    by_name = llmos("run", PROMPT, "--model", "tiny-llama", *GREEDY)
    assert stdout(by_name) == stdout(llmos("run", PROMPT, "--model", d, *GREEDY))
    assert llmos("models", "rm", "tiny-llama").exit_code == 0
    assert "tiny-llama" not in llmos("models").stdout
    assert_user_error(llmos("models", "rm", "tiny-llama"), "no registered model named 'tiny-llama'")


def test_models_list_shows_a_vanished_model_as_missing(tiny_model_dir, tmp_path):
    d = tmp_path / "ephemeral"
    shutil.copytree(tiny_model_dir, d)
    assert llmos("models", "add", d).exit_code == 0
    shutil.rmtree(d)
    listing = llmos("models")
    assert listing.exit_code == 0, listing.output
    assert "missing" in next(line for line in listing.stdout.splitlines() if "ephemeral" in line)
    assert_user_error(llmos("run", PROMPT, "--model", "ephemeral"), "no longer exists", "llmos models rm ephemeral")


def test_models_add_rejects_bad_input_and_changes_nothing(tiny_model_dir, tmp_path, home):
    mamba = broken_copy(tiny_model_dir, tmp_path, "mamba")
    assert_user_error(llmos("models", "add", tmp_path / "nope"), "is not a directory")
    assert_user_error(llmos("models", "add", mamba), "'mamba'", "not supported")
    assert not home.exists()
    assert llmos("models", "add", tiny_model_dir, "--name", "t").exit_code == 0
    db = (home / "llmos.db").read_bytes()
    assert_user_error(llmos("models", "add", tiny_model_dir, "--name", "t"), "already registered")
    assert_user_error(llmos("models", "add", tiny_model_dir, "--name", "default"), "reserved")
    assert (home / "llmos.db").read_bytes() == db


def test_a_corrupt_database_is_one_clear_error(home):
    home.mkdir()
    (home / "llmos.db").write_bytes(b"garbage" * 100)
    assert_user_error(llmos("models"), str(home / "llmos.db"))
    assert (home / "llmos.db").read_bytes() == b"garbage" * 100


# ---- the shell as a program --------------------------------------------------------------------


def test_version_help_and_registered_commands():
    assert llmos("--version").stdout.strip() == f"llmos {cli.llmos.__version__}"
    listing = llmos("--help").stdout
    for command in ("run", "chat", "models", "train"):
        assert command in listing
    assert ("bench" in listing) == (importlib.util.find_spec("llmos.cli.bench_cmd") is not None)
    train_help = llmos("train", "--help")
    assert train_help.exit_code == 0 and "--data" in train_help.stdout


def test_the_console_script_streams_and_fails_cleanly(tiny_model_dir, tmp_path):
    ok = subprocess_llmos("run", PROMPT, "--model", tiny_model_dir, *GREEDY)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == stdout(llmos("run", PROMPT, "--model", tiny_model_dir, *GREEDY))
    assert "finish: length" in ok.stderr
    bad = subprocess_llmos("run", PROMPT, "--model", broken_copy(tiny_model_dir, tmp_path, "truncated"))
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and "truncated" in bad.stderr


def test_help_does_not_import_torch():
    code = "import sys, llmos.cli.main as m; m.app(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("False")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def sigint_default() -> None:
    """In the child: Ctrl-C as a terminal delivers it, even when this test run inherited SIGINT ignored (a
    background job of a non-interactive shell), which Python would otherwise keep."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_quietly(tiny_model_dir):
    chat = subprocess.Popen([sys.executable, "-m", "llmos.cli.main", "chat", "--model", str(tiny_model_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    try:
        while "chatting with" not in (line := chat.stderr.readline()):  # until the model is loaded
            assert line, "chat exited before it was ready"
        chat.send_signal(signal.SIGINT)
        stdout, stderr = chat.communicate(timeout=60)
    finally:
        chat.kill()
    assert chat.returncode == 130, stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr and stdout == ""


def test_ctrl_c_during_a_chat_reply_stops_the_reply_not_the_chat(tiny_model_dir, monkeypatch, capsys):
    kernel = Kernel(tiny_model_dir, KernelConfig(kv_memory="16MiB"))
    session = cli.ChatSession(kernel, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), None)
    real_stream = syscalls.stream

    def interrupted(kernel, pid, owner="local"):
        it = real_stream(kernel, pid, owner)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(syscalls, "stream", interrupted)
    cli.chat_turn(session, "hello")
    assert "interrupted" in capsys.readouterr().err
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert kernel.block_manager.num_used_blocks == 0  # the reply's process was killed, its blocks freed
    assert all(p.is_finished for p in kernel.processes.values())
    monkeypatch.setattr(syscalls, "stream", real_stream)
    cli.chat_turn(session, "and again")  # the chat goes on
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
