"""The kernel shell end to end on a tiny model: a script that spawns, forks, suspends, renices, hibernates and
resumes processes of two owners; `top` in batch mode; every bad input stops a script with exit 2 and one line;
the interactive loop goes on after an error; and the top-level `ps`, `resume` and `run --hibernate-after`.
The oracle for hibernation is `llmos run`: a greedy process hibernated and resumed writes the same text.
"""

import re

import pytest
from typer.testing import CliRunner

from llmos.cli import main as cli
from llmos.cli import shell
from llmos.kernel.hibernate import default_store
from llmos.kernel.kernel import Kernel, KernelConfig

PROMPT = "In the beginning God created"
GREEDY = ["--temperature", "0", "--ignore-eos", "--max-tokens", "12"]
HID = re.compile(r"h[0-9a-f]{10}")
runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "250")
    return tmp_path / "home"


def llmos(*args, input=None):
    return runner.invoke(cli.app, [str(a) for a in args], input=input)


def sh(model_dir, commands, *flags):
    return llmos("sh", "--model", model_dir, "--kv-memory", "16MiB", *flags, "-c", commands)


def straight(model_dir) -> str:
    """The greedy text of PROMPT from `llmos run` (the oracle)."""
    done = llmos("run", PROMPT, "--model", model_dir, *GREEDY, "--no-stats")
    assert done.exit_code == 0, done.output
    return stdout(done).removesuffix("\n")


def stdout(result) -> str:
    """stdout exactly as written (generated text may hold "\\r", which `result.stdout` rewrites)."""
    return result.stdout_bytes.decode("utf-8")


def ps_rows(text: str) -> dict[int, list[str]]:
    """pid -> the columns of each row of every `ps` table in `text` (the last table wins)."""
    rows = {}
    for line in text.splitlines():
        cols = line.split()
        if cols and cols[0].isdigit() and len(cols) >= 12:
            rows[int(cols[0])] = cols
    return rows


def assert_user_error(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


# ---- a whole session ---------------------------------------------------------------------------


def test_a_script_drives_processes_of_two_owners_through_every_verb(tiny_model_dir, tmp_path):
    script = tmp_path / "session.llmos"
    script.write_text(f"""
# pid 1 (greedy, the oracle's), pid 2 (bob's), pid 3 (sampled)
spawn {' '.join(GREEDY)} {PROMPT}
spawn --owner bob --seed 1 --max-tokens 10 And the earth
spawn --seed 2 --max-tokens 10 def main
step 2
fork 3 2; suspend 3; nice 1 -5
ps
step 2; resume 3
hibernate 1
resume $!
hibernated
run
ps -a
cat $!
""")
    done = llmos("sh", "--model", tiny_model_dir, "--policy", "fair", "--admin", script)
    assert done.exit_code == 0, done.output
    assert done.stderr == ""
    lines = done.stdout.split("\n")
    assert lines[:3] == ["1", "2", "3"]
    assert "4 5" in lines  # fork
    hid = next(line for line in lines if HID.fullmatch(line))
    assert lines[lines.index(hid) + 1] == "6"  # the restored process's new pid
    # Its image stays on disk while the restored process runs (an interrupted resume loses nothing) ...
    assert any(line.split()[:1] == [hid] for line in lines[lines.index(hid) + 2:])

    first_ps = done.stdout.split("steps, ", 1)[1].split(hid, 1)[0]
    last_ps = done.stdout.split(hid)[-1]  # after the `hibernated` listing, which names the image again
    during = ps_rows(first_ps)
    assert during[1][1:4] == ["local", "running", "-5"] and during[2][1] == "bob"  # --admin sees every owner
    assert during[3][2] == "suspended" and during[3][7] == "0" and int(during[3][8]) > 0  # swapped out to host
    assert during[4][4] == during[5][4] == "3"  # the children's parent
    after = ps_rows(last_ps)
    assert after[1][2] == "hibernated"
    assert after[6][2:4] == ["finished", "(length)"] and after[6][4] == "-5"  # the nice level survives hibernation
    assert all(after[pid][2] == "finished" for pid in (2, 3, 4, 5))
    assert after[6][7] == "12" and after[4][7] == after[5][7] == "10"  # output tokens

    # hibernate + restore changed nothing in the greedy text
    assert stdout(done).endswith("\n" + straight(tiny_model_dir) + "\n")


def test_a_plain_shell_sees_only_its_owners_processes(tiny_model_dir):
    done = sh(tiny_model_dir, "spawn --owner bob x; spawn y; ps; kill 2; ps -a")
    assert done.exit_code == 0, done.output
    rows = ps_rows(done.stdout)
    assert set(rows) == {2} and rows[2][2] == "killed"
    assert_user_error(sh(tiny_model_dir, "spawn --owner bob x; kill 1"), "no process with pid 1")


def test_top_renders_frames_while_the_kernel_runs(tiny_model_dir):
    done = sh(tiny_model_dir, "spawn --max-tokens 20 hello; spawn -n 2 --max-tokens 20 hello; "
                              "top --iterations 3 --interval 0; mem")
    assert done.exit_code == 0, done.output
    frames = done.stdout.split("llmos top - ")[1:]
    assert len(frames) == 3
    steps = [int(re.search(r"step (\d+)", f).group(1)) for f in frames]
    assert steps == sorted(steps) and steps[0] < steps[-1]  # the shell stepped the kernel between frames
    for word in ("KV pool", "swap", "prefix cache", "policy", "fcfs", "PID", "TOK/S", "owner local"):
        assert word in frames[-1], word
    assert set(ps_rows(frames[-1])) == {1, 2, 3}  # the parallel sample's child shows up
    assert "prompt tokens hit" in done.stdout.split("llmos top - ")[-1]  # `mem` after the frames


def test_step_run_wait_and_exit(tiny_model_dir):
    done = sh(tiny_model_dir, "spawn --max-tokens 5 --ignore-eos a; spawn --max-tokens 30 b; step 3; wait 1; "
                              "suspend 2; run; ps -a; exit; spawn never")
    assert done.exit_code == 0, done.output
    assert "3 steps," in done.stdout and "1 finished (length), 5 output tokens" in done.stdout
    rows = ps_rows(done.stdout)
    assert rows[1][2] == "finished" and rows[2][2] == "suspended" and 3 not in rows


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("commands, words", [
    ("frobnicate", ["No such command 'frobnicate'", "`help`"]),
    ("kill", ["Missing argument", "`kill --help`"]),
    ("kill abc", ["'pid'", "integer"]),
    ("spawn x; kill 7", ["no process with pid 7"]),
    ("spawn x; nice 1 99", ["nice level", "99"]),
    ("spawn x; nice 1 -21", ["nice level", "-21"]),
    ("resume h0123456789", ["no hibernated process h0123456789"]),
    ("resume xyz", ["neither a pid nor a hibernation id"]),
    ("spawn x; resume 1", ["not suspended"]),
    ("spawn x; suspend 1; wait 1", ["suspended", "resume 1"]),
    ("spawn x; kill 1; fork 1", ["has ended"]),
    ("spawn --bogus x", ["No such option: --bogus"]),
    ("spawn -t -1 x", ["temperature"]),
    ('spawn "unclosed', ["No closing quotation"]),
    ("cat $!", ["$! is not set"]),
    ("top --iterations 0", ["--iterations"]),
])
def test_every_bad_command_stops_a_script_with_one_line(tiny_model_dir, commands, words):
    done = sh(tiny_model_dir, commands + "; spawn after_the_error")
    assert_user_error(done, "line 1: ", *words)
    assert "after_the_error" not in done.stdout and done.stdout.count("\n") <= 1  # nothing ran after it


def test_a_corrupt_image_is_one_clear_error(tiny_model_dir, home):
    done = sh(tiny_model_dir, "spawn --max-tokens 20 x; step 3; hibernate 1")
    hid = done.stdout.split()[-1]
    assert done.exit_code == 0 and HID.fullmatch(hid), done.output
    path = default_store().path(hid, "local")
    path.write_bytes(path.read_bytes()[:-7])
    assert_user_error(sh(tiny_model_dir, f"resume {hid}"), hid, "corrupt")
    assert_user_error(llmos("resume", hid, "--model", tiny_model_dir), hid, "corrupt")
    listed = llmos("ps")
    assert listed.exit_code == 0 and hid in listed.stdout and "corrupt" in listed.stdout


def test_kill_of_a_hibernated_process_deletes_its_image(tiny_model_dir, home):
    done = sh(tiny_model_dir, "spawn --max-tokens 20 x; step 3; hibernate 1; kill 1; hibernated; ps -a")
    assert done.exit_code == 0, done.output
    assert HID.search(done.stdout) and "(no hibernated processes)" in done.stdout
    assert ps_rows(done.stdout)[1][2] == "killed" and not default_store().list("local")
    done = sh(tiny_model_dir, "spawn --max-tokens 20 x; step 3; hibernate 1; resume $!; kill 1")
    assert_user_error(done, "line 1: ", "runs again as pid 2", "kill pid 2")


def test_bad_shell_flags_and_scripts(tiny_model_dir, tmp_path):
    assert_user_error(llmos("sh", "--model", tiny_model_dir, "--policy", "lottery", "-c", "ps"), "lottery")
    assert_user_error(llmos("sh", "--model", tiny_model_dir, "--owner", " ", "-c", "ps"), "--owner")
    assert_user_error(llmos("sh", "--model", tiny_model_dir, tmp_path / "missing.llmos"), "does not exist")
    assert_user_error(llmos("sh", "--model", tiny_model_dir, tmp_path, "-c", "ps"), "not both")


def test_commands_from_piped_stdin(tiny_model_dir):
    done = llmos("sh", "--model", tiny_model_dir, input="spawn a\nps\nkill 1\nkill 2\nps\n")
    assert_user_error(done, "line 4: ", "no process with pid 2")
    assert done.stdout.startswith("1\n") and 1 in ps_rows(done.stdout)


def test_the_interactive_loop_reports_errors_and_goes_on(tiny_model_dir, monkeypatch, capsys):
    typed = iter(["spawn --max-tokens 4 --ignore-eos hello", "kill 9", "bogus; ps", "run", "cat 1"])

    def fake_input(prompt):
        assert "llmos>" in prompt
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(cli.out, "input", fake_input)
    session = shell.Session(Kernel(tiny_model_dir, KernelConfig(kv_memory="16MiB")), "local")
    assert shell.command_loop(session, None) == 0
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and "no process with pid 9" in errors[0] and "bogus" in errors[1]
    assert "line" not in captured.err  # interactive errors carry no line number
    assert "tokens, idle" in captured.out  # `run`
    assert session.kernel.ps("local", all=True)[0]["state"] == "FINISHED"


# ---- top-level ps, resume and run --hibernate-after ------------------------------------------------


def test_run_hibernate_after_then_resume_by_id_equals_one_straight_run(tiny_model_dir):
    expected = straight(tiny_model_dir)
    first = llmos("run", PROMPT, "--model", tiny_model_dir, *GREEDY, "--hibernate-after", "5")
    assert first.exit_code == 0, first.output
    hid = HID.search(first.stderr).group(0)
    assert f"hibernated as {hid}; continue with: llmos resume {hid}" in first.stderr

    listed = llmos("ps")
    assert listed.exit_code == 0 and "llmos sh" in listed.stderr  # the note about live processes
    row = next(line.split() for line in listed.stdout.splitlines() if hid in line)
    assert row[1] == tiny_model_dir.name and row[3] == "5" and row[-1] == "ok"  # model, output tokens, status

    second = llmos("resume", hid, "--model", tiny_model_dir, "--hibernate-after", "3")
    assert second.exit_code == 0, second.output
    hid2 = HID.search(second.stderr).group(0)
    assert hid2 != hid

    assert llmos("models", "add", tiny_model_dir, "--name", "tiny").exit_code == 0  # resume finds it by name
    third = llmos("resume", hid2)
    assert third.exit_code == 0, third.output
    assert "4 more output tokens (12 in all)" in third.stderr and "finish: length" in third.stderr
    assert stdout(first) + stdout(second) + stdout(third).removesuffix("\n") == expected

    assert_user_error(llmos("resume", hid2), f"no hibernated process {hid2}")  # resumed images are gone
    assert_user_error(llmos("resume", "bogus"), "invalid hibernation id")
    assert llmos("ps").stdout == ""


def test_resume_without_a_model_it_can_find_is_one_clear_error(tiny_model_dir):
    first = llmos("run", PROMPT, "--model", tiny_model_dir, *GREEDY, "--hibernate-after", "2")
    hid = HID.search(first.stderr).group(0)
    assert_user_error(llmos("resume", hid), tiny_model_dir.name, "--model")
    assert_user_error(llmos("resume", hid, "--owner", "bob", "--model", tiny_model_dir), "no hibernated process")
    again = llmos("resume", hid, "--model", tiny_model_dir, "--max-steps", "1")  # one step: one token, then back
    assert again.exit_code == 0 and HID.search(again.stderr).group(0) != hid, again.output
    bad = llmos("run", PROMPT, "--model", tiny_model_dir, "--hibernate-after", "0")  # a usage error, like --max-tokens
    assert bad.exit_code == 2 and "Traceback" not in bad.output and "--hibernate-after" in bad.output


def test_run_hibernate_after_past_the_end_just_finishes(tiny_model_dir):
    done = llmos("run", PROMPT, "--model", tiny_model_dir, *GREEDY, "--hibernate-after", "50")
    assert done.exit_code == 0 and "hibernated" not in done.stderr and "finish: length" in done.stderr
    assert stdout(done).removesuffix("\n") == straight(tiny_model_dir)
