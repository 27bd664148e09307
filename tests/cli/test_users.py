"""Users, API keys and quotas in LLMOS_HOME/llmos.db: hashed keys, authentication and its cache, revocation seen at
once by another store, name and last-admin rules, and `llmos user ...` end to end with bad inputs exiting 2.
"""

import hashlib
import secrets
import sqlite3
import stat
import time

import pytest
from typer.testing import CliRunner

from llmos.cli import main as cli
from llmos.fs import registry, users
from llmos.fs.users import Quota, UsersError, UserStore

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "250")  # keep rich tables on one line per row
    return tmp_path / "home"


@pytest.fixture
def store():
    return UserStore()


def scrypt_calls(monkeypatch):
    """Count the costly key checks."""
    calls = []
    real = users._scrypt

    def counting(secret, salt):
        calls.append(secret)
        return real(secret, salt)

    monkeypatch.setattr(users, "_scrypt", counting)
    return calls


# ---- keys ------------------------------------------------------------------------------------------


def test_key_format_and_only_salt_and_scrypt_hash_are_stored(store, home):
    store.add_user("alice")
    keys = [store.create_key("alice", label="laptop") for _ in range(3)]
    for key in keys:
        key_id, secret = users.KEY_PATTERN.fullmatch(key).groups()
        assert key.startswith("sk-llmos-") and len(key_id) == 8 and len(secret) == 32
        with sqlite3.connect(store.db_path) as conn:
            salt, stored = conn.execute("SELECT salt, hash FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        assert len(salt) == 16 and stored == hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    assert len({users.KEY_PATTERN.fullmatch(k).group(2) for k in keys}) == 3
    files = [f for f in home.iterdir() if f.is_file()]  # llmos.db and any -wal / -shm beside it
    assert files
    everything = b"".join(f.read_bytes() for f in files)
    for key in keys:
        secret = users.KEY_PATTERN.fullmatch(key).group(2)
        for leak in (key, secret, secret[:16], hashlib.sha256(key.encode()).hexdigest()):
            assert leak.encode() not in everything
        assert hashlib.sha256(key.encode()).digest() not in everything
    assert [(k.user, k.label) for k in store.list_keys()] == [("alice", "laptop")] * 3
    assert not hasattr(store.list_keys()[0], "hash")


def test_authenticate_right_wrong_revoked_and_removed(store):
    store.add_user("root", "admin")
    store.add_user("bob")
    root_key, bob_key = store.create_key("root"), store.create_key("bob")
    assert store.authenticate(root_key).name == "root" and store.authenticate(root_key).is_admin
    bob = store.authenticate(bob_key)
    assert (bob.name, bob.role, bob.keys, bob.quota) == ("bob", "user", 1, Quota())
    key_id, secret = users.KEY_PATTERN.fullmatch(bob_key).groups()
    wrong = f"sk-llmos-{key_id}-{'A' * 32}"
    for bad in (wrong, bob_key[:-1], bob_key + "x", "sk-llmos-00000000-" + secret, "", "Bearer " + bob_key, None, 42):
        assert store.authenticate(bad) is None, bad
    assert store.revoke_key(key_id).user == "bob"
    assert store.authenticate(bob_key) is None
    other = store.create_key("bob")
    assert store.authenticate(other).name == "bob"
    store.remove_user("bob")
    assert store.authenticate(other) is None
    assert store.list_keys() == [store.list_keys("root")[0]]  # bob's keys went with bob


def test_second_check_of_a_key_skips_scrypt_and_takes_under_5ms(store, monkeypatch):
    store.add_user("alice")
    key = store.create_key("alice")
    calls = scrypt_calls(monkeypatch)
    assert store.authenticate(key).name == "alice" and len(calls) == 1
    times = []
    for _ in range(5):
        start = time.perf_counter()
        assert store.authenticate(key).name == "alice"
        times.append(time.perf_counter() - start)
    assert len(calls) == 1, "cached checks must not run scrypt"
    assert min(times) < 0.005, times
    key_id = users.KEY_PATTERN.fullmatch(key).group(1)
    assert store.authenticate(f"sk-llmos-{key_id}-{'B' * 32}") is None and len(calls) == 2  # a cached id is no pass
    assert store.authenticate(key) is not None and len(calls) == 2  # and does not evict the good entry


def test_revocation_and_removal_are_seen_by_another_store_at_once(store):
    store.add_user("admin")
    store.add_user("bob")
    key, kept = store.create_key("bob"), store.create_key("bob")
    daemon = UserStore()  # as another process would: its own cache, the same file
    assert daemon.authenticate(key).name == "bob" and daemon.authenticate(kept).name == "bob"
    store.revoke_key(users.KEY_PATTERN.fullmatch(key).group(1))
    assert daemon.authenticate(key) is None
    store.set_quota("bob", max_processes=2)  # a cached key still gets the fresh quota
    assert daemon.authenticate(kept).quota == Quota(max_processes=2)
    store.remove_user("bob")
    assert daemon.authenticate(kept) is None


def test_a_reused_key_id_does_not_revive_a_revoked_key(store, monkeypatch):
    store.add_user("alice")
    monkeypatch.setattr(secrets, "token_hex", lambda n: "abcd0123")
    old = store.create_key("alice")
    daemon = UserStore()
    assert daemon.authenticate(old).name == "alice"
    store.revoke_key("abcd0123")
    new = store.create_key("alice")  # the same id, a different secret and salt
    assert users.KEY_PATTERN.fullmatch(new).group(1) == "abcd0123"
    assert daemon.authenticate(old) is None
    assert daemon.authenticate(new).name == "alice"


def test_last_used_is_recorded(store):
    store.add_user("alice")
    key = store.create_key("alice")
    assert store.list_keys("alice")[0].last_used is None
    before = time.time()
    store.authenticate(key)
    assert store.list_keys("alice")[0].last_used >= before


def test_revoke_accepts_a_whole_key_and_refuses_unknown_ids(store):
    store.add_user("alice")
    key = store.create_key("alice")
    assert store.revoke_key(key).key_id == users.KEY_PATTERN.fullmatch(key).group(1)
    with pytest.raises(UsersError, match="no API key with id 'deadbeef'.*llmos user keys"):
        store.revoke_key("deadbeef")


# ---- users, roles and quotas -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "ünï", "a/b", "tab\t", "x\n", "semi;colon", None])
def test_invalid_names_are_refused_clearly(store, name):
    with pytest.raises(UsersError, match="invalid user name.*1 to 64 letters, digits and _ . -"):
        store.add_user(name)
    assert not store.has_users()


def test_valid_names(store):
    names = ["a", "a" * 64, "ci-bot.01", "Under_score", "0"]
    for name in names:
        store.add_user(name, "admin")
    assert [u.name for u in store.list_users()] == sorted(names)


def test_roles_duplicates_and_unknown_users(store):
    with pytest.raises(UsersError, match="invalid role 'root': use admin or user"):
        store.add_user("alice", "root")
    with pytest.raises(UsersError, match="no admin yet.*--role admin"):
        store.add_user("alice", "user")
    assert store.add_user("alice").role == "admin"  # the first user defaults to admin
    assert store.add_user("bob").role == "user"  # later ones to user
    with pytest.raises(UsersError, match="'alice' already exists.*llmos user rm alice"):
        store.add_user("alice", "user")
    for call in (lambda: store.remove_user("zed"), lambda: store.create_key("zed"), lambda: store.get_quota("zed"),
                 lambda: store.set_quota("zed", 1), lambda: store.list_keys("zed")):
        with pytest.raises(UsersError, match="no user named 'zed'.*llmos user list"):
            call()
    assert store.get_user("zed") is None and store.get_user("bob").role == "user"
    assert [(u.name, u.role) for u in store.list_users()] == [("alice", "admin"), ("bob", "user")]


def test_the_last_admin_goes_only_after_everyone_else(store):
    store.add_user("alice", "admin")
    store.add_user("bob")
    with pytest.raises(UsersError, match="'alice' is the last admin and 1 other user.*--role admin"):
        store.remove_user("alice")
    store.add_user("carol", "admin")
    store.remove_user("alice")  # carol is still an admin
    with pytest.raises(UsersError, match="last admin"):
        store.remove_user("carol")
    store.remove_user("bob")
    store.remove_user("carol")  # the last user of all may go: back to single-user mode
    assert not store.has_users() and store.list_users() == []


def test_quotas_set_get_clear_and_cascade(store):
    store.add_user("alice")
    assert store.get_quota("alice") == Quota() and Quota().unlimited
    assert store.set_quota("alice", max_processes=4, max_kv_blocks=0) == Quota(4, None, 0)
    assert store.get_quota("alice") == Quota(4, None, 0) and store.list_users()[0].quota == Quota(4, None, 0)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(UsersError, match="invalid max processes.*whole number from 0 to"):
            store.set_quota("alice", max_processes=bad)
    assert store.get_quota("alice") == Quota(4, None, 0)  # a refused change changes nothing
    store.set_quota("alice")
    assert store.get_quota("alice") == Quota()
    store.set_quota("alice", tokens_per_minute=1000)
    store.create_key("alice")
    store.remove_user("alice")
    with sqlite3.connect(store.db_path) as conn:  # the cascade took the key and the quota too
        assert conn.execute("SELECT COUNT(*) FROM api_keys").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM quotas").fetchone() == (0,)


def test_single_user_mode_is_loopback_only(store, home):
    assert not store.has_users() and store.authenticate("sk-llmos-00000000-" + "a" * 32) is None
    assert store.list_users() == [] and store.list_keys() == []
    assert not home.exists()  # reads never create LLMOS_HOME
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert store.auth_required(host) is False
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        with pytest.raises(UsersError, match=f"refusing to listen on {host}.*single-user mode.*llmos user add"):
            store.auth_required(host)
    store.add_user("alice")
    assert store.auth_required("0.0.0.0") is True and store.auth_required("127.0.0.1") is True


# ---- the database ----------------------------------------------------------------------------------


def test_shares_llmos_db_with_the_registry_and_its_permissions(tmp_path, home, store, monkeypatch):
    with registry._transaction() as conn:
        conn.execute("INSERT INTO models VALUES ('m', '/x', 'now')")
    store.add_user("alice")
    assert store.db_path == registry.db_path() == home / "llmos.db"
    assert [m.name for m in registry.list_models()] == ["m"] and store.has_users()
    users_only = tmp_path / "other"
    monkeypatch.setenv("LLMOS_HOME", str(users_only))
    UserStore().add_user("bob")
    mode = stat.S_IMODE((users_only / "llmos.db").stat().st_mode)
    assert mode == stat.S_IMODE((home / "llmos.db").stat().st_mode)  # the same as the registry makes
    assert not mode & (stat.S_IWGRP | stat.S_IWOTH)
    with sqlite3.connect(home / "llmos.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_explicit_db_path(tmp_path, home):
    db = tmp_path / "elsewhere" / "users.db"
    s = UserStore(db)
    s.add_user("alice")
    assert db.is_file() and not home.exists() and UserStore(str(db)).get_user("alice").is_admin


def test_corrupt_database_names_the_file_and_is_left_alone(home, store):
    home.mkdir()
    db = home / "llmos.db"
    junk = b"this is not an SQLite database\n" * 200
    db.write_bytes(junk)
    for call in (store.list_users, lambda: store.add_user("alice"), lambda: store.authenticate(
            "sk-llmos-00000000-" + "a" * 32)):
        with pytest.raises(UsersError, match=str(db)):
            call()
    assert db.read_bytes() == junk


def test_a_failed_transaction_leaves_no_trace(store):
    store.add_user("kept")
    with pytest.raises(RuntimeError):
        with store._transaction() as conn:
            conn.execute("INSERT INTO users VALUES ('half', 'user', 0)")
            raise RuntimeError("crash mid-write")
    assert [u.name for u in store.list_users()] == ["kept"]


# ---- llmos user ... --------------------------------------------------------------------------------


def llmos(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def assert_user_error(result, *words):
    """Exit 2, one `error: ...` line on stderr naming the problem, no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_cli_round_trip():
    result = llmos("user", "list")
    assert result.exit_code == 0 and "single-user mode" in result.stderr
    result = llmos("user", "add", "alice")
    assert result.exit_code == 0, result.output
    alice_key = result.stdout.strip()
    assert users.KEY_PATTERN.fullmatch(alice_key) and "will not be shown again" in result.stderr
    bob_key = llmos("user", "add", "bob", "--label", "laptop").stdout.strip()
    result = llmos("user", "key", "bob", "--label", "phone")
    assert result.exit_code == 0 and "shown this once" in result.stderr
    phone_key = result.stdout.strip()
    store = UserStore()
    assert [store.authenticate(k).name for k in (alice_key, bob_key, phone_key)] == ["alice", "bob", "bob"]

    result = llmos("user", "list")
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and "sk-llmos" not in result.output
    assert lines[1].split()[:6] == ["alice", "admin", "1", "unlimited", "unlimited", "unlimited"]
    assert lines[2].split()[:3] == ["bob", "user", "2"]
    result = llmos("user", "keys", "bob")
    assert result.exit_code == 0 and "sk-llmos" not in result.output
    assert [line.split()[1:3] for line in result.stdout.splitlines()[1:]] == [["bob", "laptop"], ["bob", "phone"]]

    result = llmos("user", "quota", "bob", "--max-processes", "3", "--max-kv-blocks", "100")
    assert result.exit_code == 0 and "max processes 3" in result.stdout
    llmos("user", "quota", "bob", "--tokens-per-minute", "500")  # the others stay as they were
    assert store.get_quota("bob") == Quota(3, 500, 100)
    llmos("user", "quota", "bob", "--max-processes", "unlimited")
    assert store.get_quota("bob") == Quota(None, 500, 100)
    assert "tokens/min 500" in llmos("user", "quota", "bob").stdout

    phone_id = users.KEY_PATTERN.fullmatch(phone_key).group(1)
    result = llmos("user", "revoke", phone_id)
    assert result.exit_code == 0 and f"revoked key {phone_id} of bob" in result.stdout
    assert store.authenticate(phone_key) is None and store.authenticate(bob_key).name == "bob"
    result = llmos("user", "rm", "bob")
    assert result.exit_code == 0 and "removed user bob and its 1 API key(s)" in result.stdout
    assert store.authenticate(bob_key) is None
    assert llmos("user", "rm", "alice").exit_code == 0 and not store.has_users()


def test_cli_bad_inputs_exit_2_with_one_line_and_change_nothing():
    llmos("user", "add", "alice")
    llmos("user", "add", "bob")
    store = UserStore()
    before = (store.list_users(), store.list_keys())
    assert_user_error(llmos("user", "add", "bad name"), "invalid user name 'bad name'")
    assert_user_error(llmos("user", "add", "x" * 65), "invalid user name")
    assert_user_error(llmos("user", "add", "carol", "--role", "root"), "invalid role 'root'")
    assert_user_error(llmos("user", "add", "bob"), "already exists")
    assert_user_error(llmos("user", "add", "carol", "--label", "a\x07b"), "invalid key label")
    assert_user_error(llmos("user", "rm", "alice"), "last admin")
    assert_user_error(llmos("user", "rm", "zed"), "no user named 'zed'")
    assert_user_error(llmos("user", "key", "zed"), "no user named 'zed'")
    assert_user_error(llmos("user", "keys", "zed"), "no user named 'zed'")
    assert_user_error(llmos("user", "revoke", "deadbeef"), "no API key with id 'deadbeef'")
    assert_user_error(llmos("user", "quota", "zed"), "no user named 'zed'")
    for value in ("-1", "abc", "1.5", "²"):
        assert_user_error(llmos("user", "quota", "bob", "--max-processes", value), "invalid --max-processes")
    assert (store.list_users(), store.list_keys()) == before


def test_a_quota_too_big_for_the_database_is_refused(tmp_path):
    from llmos.fs.users import UserStore, UsersError
    store = UserStore(tmp_path / "llmos.db")
    store.add_user("bob")
    with pytest.raises(UsersError, match="2\\*\\*63"):
        store.set_quota("bob", tokens_per_minute=10**30)


def test_removing_a_user_removes_their_sessions_and_hibernated_processes(tmp_path):
    import hashlib

    from llmos.fs.sessions import SessionStore
    from llmos.fs.users import UserStore
    db = tmp_path / "llmos.db"
    users, sessions = UserStore(db), SessionStore(db)
    users.add_user("admin")
    users.add_user("bob")
    sessions.create("bob", "default", "old bob secret")
    digest = hashlib.sha256(b"bob").hexdigest()[:32]
    (tmp_path / "hibernate" / digest).mkdir(parents=True)
    (tmp_path / "hibernate" / digest / "h0123456789.safetensors").write_bytes(b"x")
    users.remove_user("bob")
    users.add_user("bob")
    assert sessions.list("bob") == []
    assert not (tmp_path / "hibernate" / digest).exists()
