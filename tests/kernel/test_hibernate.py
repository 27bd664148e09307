"""Hibernation images: exact round trips, every kind of damage refused with a clear error, atomic writes,
owner isolation, fingerprints, and K/V moved between pools of different block sizes."""

import hashlib
import json
import os
import pickle
import stat
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmos.errors import HibernationError
from llmos.kernel import hibernate
from llmos.kernel.hibernate import (
    HibernationImage,
    HibernationStore,
    default_store,
    gather_kv,
    load_image,
    model_fingerprint,
    new_hid,
    params_from_dict,
    params_to_dict,
    save_image,
    scatter_kv,
    weights_fingerprint,
)
from llmos.kernel.proc import Process
from llmos.model.config import ModelConfig
from llmos.model.sampling import SamplingParams

LAYERS, BLOCK, HEADS, HEAD_DIM = 2, 4, 2, 8
PARAMS = SamplingParams(max_tokens=20, temperature=0.7, top_k=5, top_p=0.9, seed=7, stop=("\n\n", "END"),
                        stop_token_ids=(2, 3))
FINGERPRINT = "ab" * 32


def make_image(dtype=torch.float32, computed=7, seeded=True, **overrides) -> tuple[HibernationImage, torch.Generator]:
    """13 tokens, 7 computed (2 blocks of 4), a generator that has already drawn some numbers."""
    g = torch.Generator().manual_seed(7)
    torch.rand(17, generator=g)
    kv = torch.randn(LAYERS, 2, -(-computed // BLOCK), BLOCK, HEADS, HEAD_DIM).to(dtype) if computed else None
    fields = dict(owner="alice", model_name="tiny", model_fingerprint=FINGERPRINT,
                  prompt_token_ids=[5, 17, 0, 299, 42, 8, 8, 1, 250, 3], output_token_ids=[100, 101, 7],
                  num_computed_tokens=computed, params=params_to_dict(PARAMS), block_size=BLOCK, priority=-3,
                  rng_state=g.get_state() if seeded else None, rng_device="cpu" if seeded else None, kv=kv,
                  created=1718000000.25, text='h\u00e9llo "world" \U0001f916\n\\', num_preemptions=2,
                  extra={"held": 2, "token_times": [0.5, 1.25]})
    fields.update(overrides)
    return HibernationImage(**fields), g


def assert_same(a: HibernationImage, b: HibernationImage) -> None:
    for f in hibernate.dataclasses.fields(HibernationImage):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert x is not None and y is not None and x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y and type(x) is type(y), f.name


def saved(tmp_path, **kw) -> tuple[HibernationImage, bytes, object]:
    image, _ = make_image(**kw)
    path = tmp_path / f"{image.hid}.safetensors"
    save_image(path, image)
    return image, path.read_bytes(), path


def header_length(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def rewrite(path, mutate) -> None:
    """Rewrite `path` with its metadata document changed by `mutate(doc)`, checksums recomputed, so only the
    change itself is wrong."""
    with safe_open(str(path), framework="pt") as sf:
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        meta = sf.metadata()
    doc = json.loads(meta[hibernate.DOC_KEY])
    mutate(doc)
    text = json.dumps(doc)
    meta.update({hibernate.DOC_KEY: text, hibernate.DOC_SHA_KEY: hashlib.sha256(text.encode()).hexdigest()})
    save_file(tensors, str(path), metadata=meta)


# ---- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_every_field(tmp_path, dtype):
    image, g = make_image(dtype)
    path = tmp_path / "x.safetensors"
    save_image(path, image)
    back = load_image(path, expected_fingerprint=FINGERPRINT)
    assert_same(image, back)
    assert back.sampling_params() == PARAMS
    # the restored generator draws exactly what the original goes on to draw
    restored = back.restore_generator("cpu")
    assert torch.equal(torch.rand(64, generator=restored), torch.rand(64, generator=g))


def test_round_trip_without_kv_or_generator(tmp_path):
    image, _ = make_image(computed=0, seeded=False, params=params_to_dict(SamplingParams()))
    save_image(tmp_path / "x.safetensors", image)
    back = load_image(tmp_path / "x.safetensors")
    assert back.kv is None and back.rng_state is None and back.restore_generator("cpu") is None
    assert_same(image, back)


def test_params_dict_round_trip():
    d = params_to_dict(PARAMS)
    assert d["stop"] == ["\n\n", "END"] and json.loads(json.dumps(d)) == d
    assert params_from_dict(json.loads(json.dumps(d))) == PARAMS


def test_process_round_trip_and_kv_between_pools_of_different_block_sizes():
    """gather_kv from a pool with 4-token blocks, scatter_kv into one with 8-token blocks: every token's
    K/V lands in its slot of the new table."""
    def pool(num_blocks, block_size):
        return [(torch.randn(num_blocks, block_size, HEADS, HEAD_DIM), torch.randn(num_blocks, block_size, HEADS,
                                                                                    HEAD_DIM)) for _ in range(LAYERS)]

    def token(caches, table, block_size, i):
        return torch.stack([torch.stack((k[table[i // block_size], i % block_size],
                                         v[table[i // block_size], i % block_size])) for k, v in caches])

    p = Process(pid=3, owner="bob", model="tiny", prompt_token_ids=list(range(10)), params=PARAMS,
                output_token_ids=[11], num_computed_tokens=9, priority=4, num_preemptions=1)
    src, src_table = pool(8, 4), [5, 1, 3]
    kv = gather_kv(src, src_table, p.num_computed_tokens)
    assert kv.shape == (LAYERS, 2, 3, 4, HEADS, HEAD_DIM)
    g = torch.Generator().manual_seed(1)
    image = HibernationImage.from_process(p, model_fingerprint=FINGERPRINT, block_size=4, kv=kv, generator=g,
                                          text="abc")
    dst, dst_table = pool(4, 8), [2, 0]
    scatter_kv(image, dst, dst_table)
    for i in range(9):
        assert torch.equal(token(src, src_table, 4, i), token(dst, dst_table, 8, i)), i
    q = image.to_process(pid=12)
    assert (q.pid, q.owner, q.model, q.token_ids, q.num_computed_tokens, q.priority, q.num_preemptions, q.params) == \
        (12, "bob", "tiny", p.token_ids, 9, 4, 1, PARAMS)
    assert gather_kv(src, src_table, 0) is None
    with pytest.raises(HibernationError, match="load that model"):
        scatter_kv(image, [(k[..., :4], v[..., :4]) for k, v in dst], dst_table)


def test_generator_state_from_another_device_type_is_refused():
    image, _ = make_image(rng_device="cuda")
    with pytest.raises(HibernationError, match="resume it on a kernel running on cuda"):
        image.restore_generator("cpu")


def test_inconsistent_image_is_a_programming_error_at_save(tmp_path):
    image, _ = make_image(num_computed_tokens=12)  # 2 blocks of 4 cannot hold 12 tokens
    with pytest.raises(ValueError, match="fewer than the 3"):
        save_image(tmp_path / "x.safetensors", image)
    assert list(tmp_path.iterdir()) == []


# ---- damage ----------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(HibernationError, match="no hibernation image at .*nope.safetensors"):
        load_image(tmp_path / "nope.safetensors")


def test_truncated_file_at_every_kind_of_cut(tmp_path):
    _, data, path = saved(tmp_path)
    n = header_length(data)
    for cut in (0, 1, 7, 8, 9, n // 2, n - 1, n, n + 1, (n + len(data)) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(HibernationError, match=r"truncated|empty") as e:
            load_image(path)
        assert str(path) in str(e.value) and "delete it" in str(e.value), cut


def test_empty_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"")
    with pytest.raises(HibernationError, match="is empty"):
        load_image(path)


def test_flipped_byte_in_tensor_data_fails_the_checksum(tmp_path):
    _, data, path = saved(tmp_path)
    n = header_length(data)
    for pos in (n, n + 1, (n + len(data)) // 2, len(data) - 1):  # kv and rng_state regions
        for bit in (0, 7):
            damaged = bytearray(data)
            damaged[pos] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            with pytest.raises(HibernationError, match="tensor data fails the checksum"):
                load_image(path)


def test_flipped_byte_anywhere_in_the_header_is_refused_or_harmless(tmp_path):
    """Every single-bit flip in the 8-byte length and the JSON header either raises HibernationError or
    (e.g. in an unchecked "format": "pt" entry) loads the very same image."""
    image, data, path = saved(tmp_path)
    refused = 0
    for pos in range(header_length(data)):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << (pos % 8)
        path.write_bytes(bytes(damaged))
        try:
            back = load_image(path)
        except HibernationError:
            refused += 1
        else:
            assert_same(image, back)
    assert refused > 0.95 * header_length(data)


def test_changed_token_id_in_the_metadata_fails_the_header_checksum(tmp_path):
    _, data, path = saved(tmp_path)
    at = data.index(b"prompt_token_ids") + len(b'prompt_token_ids\\": [')
    assert data[at:at + 1] == b"5"
    path.write_bytes(data[:at] + b"4" + data[at + 1:])  # still valid JSON, a different prompt
    with pytest.raises(HibernationError, match="header fails the checksum"):
        load_image(path)


def test_pickle_and_torch_save_files_are_refused_unopened(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(pickle.dumps({"kv": [1, 2, 3]}, protocol=4))
    with pytest.raises(HibernationError, match="is a Python pickle.*never unpickles"):
        load_image(path)
    torch.save({"kv": torch.zeros(3)}, path)
    with pytest.raises(HibernationError, match="zip archive.*never unpickles"):
        load_image(path)
    path.write_bytes(b"not a safetensors file at all" * 10)
    with pytest.raises(HibernationError, match="truncated, corrupt, or not a safetensors file"):
        load_image(path)


def test_wrong_fingerprint_names_the_model(tmp_path):
    _, _, path = saved(tmp_path)
    with pytest.raises(HibernationError, match="was hibernated from model 'tiny'.*load that model to resume it"):
        load_image(path, expected_fingerprint="cd" * 32)


def test_other_safetensors_file_is_not_an_image(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(HibernationError, match="no .llmos_hibernation. metadata.*not an llmos hibernation image"):
        load_image(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("priority"), "missing the metadata field 'priority'"),
    (lambda d: d.pop("tensor_sha256"), "missing the metadata field 'tensor_sha256'"),
    (lambda d: d.update(num_computed_tokens="7"), "field 'num_computed_tokens' of the wrong type"),
    (lambda d: d.update(format_version=2), "format version 2.*upgrade llmos"),
    (lambda d: d.update(format_version="x"), "format version 'x'.*delete it"),
    (lambda d: d.update(format="other"), "not an llmos hibernation image"),
    (lambda d: d.update(num_computed_tokens=11), "kv has 2 blocks of 4 tokens, fewer than the 3"),
    (lambda d: d.update(num_computed_tokens=0), "kv is present but num_computed_tokens is 0"),
    (lambda d: d.update(params={"temperature": -1}), "bad sampling parameters"),
    (lambda d: d.update(params={"warmth": 1}), "bad sampling parameters"),
    (lambda d: d.update(hid="../x"), "hid '../x'"),
    (lambda d: d["tensors"]["kv"].update(shape=[1]), "do not match its metadata"),
])
def test_bad_metadata_is_refused(tmp_path, mutate, message):
    _, _, path = saved(tmp_path)
    rewrite(path, mutate)
    with pytest.raises(HibernationError, match=message):
        load_image(path)


# ---- atomic writes ----------------------------------------------------------------------------------------


def _fail(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _half_write_then_fail(tensors, filename, metadata=None):
    save_file(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:
        f.truncate(os.path.getsize(filename) // 2)
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("target, failing", [("os.replace", _fail), ("os.fsync", _fail),
                                             ("save_file", _half_write_then_fail)])
def test_failed_write_leaves_the_old_image_and_no_temp_file(tmp_path, monkeypatch, target, failing):
    old, data, path = saved(tmp_path)
    new, _ = make_image(hid=old.hid, output_token_ids=[1, 2, 3, 4])
    monkeypatch.setattr(f"llmos.kernel.hibernate.{target}", failing)
    with pytest.raises(HibernationError, match="cannot write hibernation image.*older image there is unchanged"):
        save_image(path, new)
    monkeypatch.undo()
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert_same(load_image(path), old)


def test_save_replaces_an_older_image_and_is_private(tmp_path):
    old, _, path = saved(tmp_path)
    new, _ = make_image(hid=old.hid, output_token_ids=[1, 2, 3, 4])
    os.chmod(path, 0o644)
    save_image(path, new)
    assert load_image(path).output_token_ids == [1, 2, 3, 4]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# ---- the store ------------------------------------------------------------------------------------------------


def test_store_modes_list_and_remove(tmp_path):
    store = HibernationStore(tmp_path)
    a, _ = make_image(hid=new_hid(), created=100.0)
    b, _ = make_image(hid=new_hid(), created=200.0, computed=0)
    for image in (a, b):
        path = store.save(image)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (tmp_path / "hibernate", path.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    corrupt = path.parent / f"{new_hid()}.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    (path.parent / f".{a.hid}.safetensors.tmp-abc").write_bytes(b"partial")  # a write in progress
    listing = store.list("alice")
    assert [e["hid"] for e in listing] == [a.hid, b.hid, corrupt.stem]  # by creation time (mtime if unreadable)
    assert listing[2]["status"] == "corrupt" and "truncated" in listing[2]["error"]
    assert listing[0] == {"hid": a.hid, "model": "tiny", "prompt_tokens": 10, "output_tokens": 3,
                          "size_bytes": store.path(a.hid, "alice").stat().st_size, "created": 100.0,
                          "status": "ok", "error": None}
    assert_same(store.load(b.hid, "alice", FINGERPRINT), b)
    store.remove(a.hid, "alice")
    with pytest.raises(HibernationError, match=f"no hibernated process {a.hid}"):
        store.load(a.hid, "alice")
    with pytest.raises(HibernationError, match=f"no hibernated process {a.hid}"):
        store.remove(a.hid, "alice")


def test_owners_never_see_each_other(tmp_path):
    store = HibernationStore(tmp_path)
    image, _ = make_image(owner="alice")
    path = store.save(image)
    assert store.list("mallory") == []
    with pytest.raises(HibernationError, match=f"no hibernated process {image.hid}"):
        store.load(image.hid, "mallory")
    with pytest.raises(HibernationError, match=f"no hibernated process {image.hid}"):
        store.remove(image.hid, "mallory")
    # even a copy of alice's file in mallory's directory does not load for mallory
    theirs = store.path(image.hid, "mallory")
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(path.read_bytes())
    with pytest.raises(HibernationError, match=f"no hibernated process {image.hid}"):
        store.load(image.hid, "mallory")
    assert store.list("mallory")[0]["status"] == "corrupt"
    assert store.owner_dir("../../etc").parent == tmp_path / "hibernate"


@pytest.mark.parametrize("hid", ["../x", "h0123456789/../../x", "../h0123456789", "H0123456789", "h012345678",
                                 "h0123456789a", "h012345678g", "", "h0123456789\n", None])
def test_bad_hid_is_refused(tmp_path, hid):
    store = HibernationStore(tmp_path)
    with pytest.raises(HibernationError, match="invalid hibernation id"):
        store.load(hid, "alice")
    with pytest.raises(HibernationError, match="invalid hibernation id"):
        store.remove(hid, "alice")
    image, _ = make_image(hid=hid)
    with pytest.raises(HibernationError, match="invalid hibernation id"):
        store.save(image)
    assert list(tmp_path.iterdir()) == []


def test_new_hid_is_valid_and_unique():
    hids = {new_hid() for _ in range(1000)}
    assert len(hids) == 1000 and all(hibernate.HID_PATTERN.fullmatch(h) for h in hids)


def test_default_store_is_in_llmos_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    store = default_store()
    assert store.root == tmp_path / "home" and store.list("alice") == []
    assert not (tmp_path / "home").exists()


# ---- fingerprints ----------------------------------------------------------------------------------------------


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(model_type="llama", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2, intermediate_size=128, max_position_embeddings=256), **kw})


def test_model_fingerprint():
    base = model_fingerprint(tiny_config().to_dict(), "float32")
    assert len(base) == 64
    assert model_fingerprint(tiny_config().to_hf(), torch.float32) == base  # HF config.json form, torch dtype
    assert model_fingerprint(tiny_config(eos_token_ids=[5], torch_dtype="bfloat16").to_dict(), "float32") == base
    assert model_fingerprint(tiny_config(rope_theta=10000).to_dict(), "float32") == base
    for other in (tiny_config(num_kv_heads=4), tiny_config(rope_theta=500000.0), tiny_config(head_dim=32),
                  tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0}), tiny_config(norm_eps=1e-6)):
        assert model_fingerprint(other.to_dict(), "float32") != base
    assert model_fingerprint(tiny_config().to_dict(), "bfloat16") != base
    assert model_fingerprint(tiny_config().to_dict(), "float32", weights_hash="00" * 32) != base
    linear = {"rope_type": "linear", "factor": 2}
    assert model_fingerprint(tiny_config(rope_scaling=linear).to_dict(), "float32") == \
        model_fingerprint(tiny_config(rope_scaling={**linear, "factor": 2.0}).to_dict(), "float32")


def test_weights_fingerprint_tells_weight_sets_apart_and_is_fast():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 5000), torch.nn.Linear(5000, 1, bias=False))  # 5.01M params
    assert sum(p.numel() for p in model.parameters()) > 5_000_000
    start = time.perf_counter()
    first = weights_fingerprint(model)
    assert time.perf_counter() - start < 1.0
    assert weights_fingerprint(model) == first
    with torch.no_grad():
        model[0].weight[123, 456] = torch.nextafter(model[0].weight[123, 456], torch.tensor(2.0))  # one ulp
    assert weights_fingerprint(model) != first
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Linear(1000, 5000), torch.nn.Linear(5000, 1, bias=False))
    assert weights_fingerprint(other) != first
    # same bytes under another name or shape are a different model
    a, b = torch.nn.Linear(4, 6, bias=False), torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        b.weight.copy_(a.weight.reshape(4, 6))
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_weights_fingerprint_of_tied_weights():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    a, b = Tied(), Tied()
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.head.weight[0, 0] += 1  # changes the shared tensor
    assert weights_fingerprint(a) != weights_fingerprint(b)
