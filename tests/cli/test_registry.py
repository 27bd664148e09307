"""The model registry in LLMOS_HOME: resolution order, add/list/remove, transactions, and a corrupt database."""

import json

import pytest

from llmos.errors import ModelLoadError, UnsupportedModelError
from llmos.fs import registry
from llmos.fs.registry import RegistryError, add_model, get_model, list_models, remove_model, resolve_model

LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                "max_position_embeddings": 256}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def model_dir(path, **overrides):
    """A directory holding only a config.json: all the registry ever reads."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **overrides}))
    return path


def test_add_list_get_remove(tmp_path):
    a, b = model_dir(tmp_path / "a"), model_dir(tmp_path / "b")
    assert add_model(a).name == "a"
    add_model(b, name="bee")
    assert [(e.name, e.path) for e in list_models()] == [("a", a), ("bee", b)]
    assert get_model("bee").path == b and get_model("nope") is None
    assert remove_model("a").path == a
    assert [e.name for e in list_models()] == ["bee"]
    assert a.is_dir()  # unregistering leaves the files alone


def test_resolution_order(tmp_path, monkeypatch):
    d = model_dir(tmp_path / "ckpt")
    add_model(d, name="mine")
    assert resolve_model(str(d)) == d  # an existing directory is itself
    assert resolve_model("mine") == d  # a registered name is its path
    monkeypatch.chdir(tmp_path)
    assert resolve_model("ckpt") == d  # a relative directory, made absolute
    bundled = model_dir(tmp_path / "bundled")
    monkeypatch.setattr(registry, "default_model_dir", lambda: bundled)
    assert resolve_model(None) == bundled == resolve_model("default")


def test_unknown_name_and_missing_bundled_model_say_how_to_fix(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="no registered model named 'ghost'.*llmos models"):
        resolve_model("ghost")
    with pytest.raises(ModelLoadError, match="model directory /no/such/dir does not exist.*llmos models"):
        resolve_model("/no/such/dir")
    monkeypatch.setattr(registry, "default_model_dir", lambda: tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="bundled default model is not installed.*absent"):
        resolve_model(None)


def test_reads_never_create_home(home):
    assert list_models() == [] and get_model("x") is None
    with pytest.raises(ModelLoadError):
        resolve_model("x")
    assert not home.exists()


def test_add_refuses_bad_directories_and_names(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a directory"):
        add_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        add_model(tmp_path / "empty")
    with pytest.raises(UnsupportedModelError, match="mamba"):
        add_model(model_dir(tmp_path / "m", model_type="mamba"))
    d = model_dir(tmp_path / "ok")
    with pytest.raises(RegistryError, match="reserved"):
        add_model(d, name="default")
    with pytest.raises(RegistryError, match="invalid model name"):
        add_model(d, name="has space")
    assert list_models() == []


def test_duplicate_name_is_refused_and_changes_nothing(tmp_path):
    first, second = model_dir(tmp_path / "one"), model_dir(tmp_path / "two")
    add_model(first, name="m")
    with pytest.raises(RegistryError, match="already registered.*--name.*llmos models rm m"):
        add_model(second, name="m")
    assert [(e.name, e.path) for e in list_models()] == [("m", first)]
    with pytest.raises(RegistryError, match="no registered model named 'zzz'"):
        remove_model("zzz")


def test_vanished_directory_is_reported(tmp_path):
    d = model_dir(tmp_path / "gone")
    add_model(d)
    (d / "config.json").unlink()
    d.rmdir()
    assert [e.name for e in list_models()] == ["gone"]
    with pytest.raises(ModelLoadError, match="no longer exists.*llmos models rm gone"):
        resolve_model("gone")


def test_a_failed_transaction_leaves_no_trace(tmp_path):
    add_model(model_dir(tmp_path / "kept"))
    with pytest.raises(RuntimeError):
        with registry._transaction() as conn:
            conn.execute("INSERT INTO models VALUES ('half', '/x', 'now')")
            raise RuntimeError("crash mid-write")
    assert [e.name for e in list_models()] == ["kept"]


def test_corrupt_database_names_the_file_and_is_left_alone(tmp_path, home):
    home.mkdir()
    db = home / "llmos.db"
    junk = b"this is not an SQLite database\n" * 200
    db.write_bytes(junk)
    for call in (list_models, lambda: resolve_model("x"), lambda: add_model(model_dir(tmp_path / "d"))):
        with pytest.raises(RegistryError, match=str(db)):
            call()
    assert db.read_bytes() == junk


def test_home_that_is_a_file_is_a_clear_error(tmp_path, home, monkeypatch):
    home.write_text("oops")
    with pytest.raises(RegistryError, match="llmos database"):
        add_model(model_dir(tmp_path / "d"))


def test_removing_the_bundled_model_is_refused_clearly(tmp_path, monkeypatch):
    from llmos.fs import registry
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    with pytest.raises(registry.RegistryError, match="bundled model"):
        registry.remove_model("default")
