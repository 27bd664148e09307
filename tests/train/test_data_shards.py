"""llmos.train.shards: round trips against a brute-force tokenization, the streaming split, uint32 ids,
SFT masks against transformers' chat template, bounded streaming, reuse and crash safety."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import llmos.train.shards as shards
from llmos.errors import DataError
from llmos.model.tokenizer import Tokenizer
from llmos.train.bpe import prepare_tokenizer
from llmos.train.shards import ShardSplit, prepare_shards, read_manifest, sft_mask

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And God said, Let there be light: and there was light.\n")
CHATS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who made light?"},
     {"role": "assistant", "content": "God said, Let there be light."}, {"role": "user", "content": "Then?"},
     {"role": "assistant", "content": "And there was light."}],
    [{"role": "user", "content": "Is it good?"}, {"role": "assistant", "content": "It was good."}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "Ünïcödé ✓ please"}, {"role": "assistant", "content": "✓ Ünïcödé"}],
]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "t.txt").write_text(TEXT * 3)
    (d / "c.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    prepare_tokenizer([d / "t.txt", d / "c.jsonl"], d / "tok", vocab_size=320, chat_tokens=True)
    return d / "tok"


@pytest.fixture
def tok(chat_tok):
    return Tokenizer.from_dir(chat_tok)


def stream_of(tok, texts, eot=0):
    """Brute force: the documented layout, one `encode` call per document."""
    out = [eot]
    for t in texts:
        out += tok.encode(t, add_special_tokens=False) + [eot]
    return out


def whole(split: ShardSplit):
    return split.window(0, len(split))


def is_val_chunk(c: int, f: float) -> bool:
    return math.floor((c + 1) * f + 0.5) > math.floor(c * f + 0.5)


# ---- lm round trips ------------------------------------------------------------------------------


def test_round_trip_equals_brute_force_tokenization(tmp_path, tok):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    docs = [f"Document {i}: " + TEXT[: 40 + 7 * i] for i in range(12)]
    for i, d in enumerate(docs[:6]):
        (data / "sub" / f"{i:02d}.txt").write_text(d)
    (data / "z.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[6:] + docs[6:8]))  # 2 dups
    manifest = prepare_shards([data], tmp_path / "shards", tok, seq_len=8, val_fraction=0.0, shard_tokens=50,
                              progress=False)
    expected = stream_of(tok, docs)
    train = ShardSplit(tmp_path / "shards", "train")
    tokens, mask = whole(train)
    assert tokens.dtype == np.int64 and mask is None and tokens.tolist() == expected
    assert len(ShardSplit(tmp_path / "shards", "val")) == 0
    assert manifest["documents"] == 12 and manifest["duplicates_removed"] == 2 and manifest["eot_id"] == 0
    assert manifest["dtype"] == "uint16" and manifest["kind"] == "lm" and manifest["vocab_size"] == tok.vocab_size
    assert [e["tokens"] for e in manifest["splits"]["train"]][:-1] == [50] * (len(expected) // 50)
    assert (tmp_path / "shards" / "train-00000.bin").stat().st_size == 100  # raw uint16
    raw = np.fromfile(tmp_path / "shards" / "train-00001.bin", dtype="<u2")
    assert raw.tolist() == expected[50:100]
    on_disk = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert read_manifest(tmp_path / "shards") == manifest == on_disk
    # windows across file boundaries
    for start, length in ((45, 10), (0, len(expected)), (99, 2), (len(expected) - 1, 1), (7, 0)):
        assert train.window(start, length)[0].tolist() == expected[start:start + length]
    with pytest.raises(IndexError):
        train.window(len(expected) - 3, 4)


def test_validation_chunks_are_spread_through_one_long_document(tmp_path, tok):
    (tmp_path / "one.txt").write_text(TEXT * 60)  # a single document
    seq_len, f = 7, 0.1
    prepare_shards([tmp_path / "one.txt"], tmp_path / "s", tok, seq_len=seq_len, val_fraction=f, shard_tokens=64,
                   progress=False)
    stream = stream_of(tok, [TEXT * 60])
    train, val = whole(ShardSplit(tmp_path / "s", "train"))[0], whole(ShardSplit(tmp_path / "s", "val"))[0]
    chunk = 8 * (seq_len + 1)
    chunks = [stream[i:i + chunk] for i in range(0, len(stream), chunk)]
    val_ids = [c for c in range(len(chunks)) if is_val_chunk(c, f)]
    assert train.tolist() == sum((chunks[c] for c in range(len(chunks)) if c not in val_ids), [])
    assert val.tolist() == sum((chunks[c] for c in val_ids), [])
    assert len(val_ids) == round(len(chunks) * f) >= 3
    gaps = np.diff(val_ids)
    assert gaps.min() >= 9 and gaps.max() <= 11 and val_ids[0] < 10  # evenly spread, not only the tail


def test_short_stream_gives_its_tail_to_validation(tmp_path, tok):
    (tmp_path / "a.txt").write_text(TEXT)
    prepare_shards([tmp_path / "a.txt"], tmp_path / "s", tok, seq_len=8, val_fraction=0.1, shard_tokens=16,
                   progress=False)
    stream = stream_of(tok, [TEXT])
    n_val = max(9, int(len(stream) * 0.1))
    assert whole(ShardSplit(tmp_path / "s", "val"))[0].tolist() == stream[-n_val:]
    assert whole(ShardSplit(tmp_path / "s", "train"))[0].tolist() == stream[:-n_val]


def test_too_short_data_is_a_data_error_and_leaves_nothing(tmp_path, tok):
    (tmp_path / "a.txt").write_text("Amen.")
    with pytest.raises(DataError, match="too short"):
        prepare_shards([tmp_path / "a.txt"], tmp_path / "s", tok, seq_len=32, val_fraction=0.05, progress=False)
    assert not (tmp_path / "s").exists()


def test_uint32_for_vocabularies_over_65536(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer(backend, {"eos_token": "<|endoftext|>"})
    text = " ".join(f"w{i}" for i in range(65_530, 65_560)) + " w69999 w1"
    (tmp_path / "big.txt").write_text(text)
    manifest = prepare_shards([tmp_path / "big.txt"], tmp_path / "s", tok, seq_len=4, val_fraction=0.0,
                              progress=False)
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 70_001
    tokens = whole(ShardSplit(tmp_path / "s", "train"))[0]
    assert tokens.tolist() == [0] + list(range(65_531, 65_561)) + [70_000, 2, 0]
    assert (tmp_path / "s" / "train-00000.bin").stat().st_size == 4 * len(tokens)


def test_chat_documents_under_lm_are_rendered_with_the_template(tmp_path, tok):
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CHATS[1]}) + "\n")
    prepare_shards([tmp_path / "c.jsonl"], tmp_path / "s", tok, seq_len=4, val_fraction=0.0, progress=False)
    rendered = tok.apply_chat_template(CHATS[1], add_generation_prompt=False)
    assert whole(ShardSplit(tmp_path / "s", "train"))[0].tolist() == stream_of(tok, [rendered])


# ---- sft ----------------------------------------------------------------------------------------


def reference_mask(hf, messages):
    """Independent oracle: transformers renders and tokenizes every prefix; a turn's target runs from the end
    of the prompt (with the generation prompt) through the first <|im_end|> after it."""
    def ids(msgs, gen):
        out = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    full = ids(messages, False)
    mask = [0] * len(full)
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(ids(messages[:i], True))
            end = full.index(im_end, start) + 1
            mask[start:end] = [1] * (end - start)
    return full, mask


def test_sft_masks_match_transformers(tmp_path, tok, chat_tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(chat_tok)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    (tmp_path / "plain.txt").write_text("Plain text is trained on in full.")
    manifest = prepare_shards([tmp_path / "c.jsonl", tmp_path / "plain.txt"], tmp_path / "s", tok, kind="sft",
                              seq_len=4, val_fraction=0.0, shard_tokens=40, progress=False)
    assert manifest["kind"] == "sft" and all(e["mask"] for e in manifest["splits"]["train"])
    expected_tokens, expected_mask = [0], [0]
    for messages in CHATS:
        full, mask = reference_mask(hf, messages)
        expected_tokens += full + [0]
        expected_mask += mask + [0]
        assert sft_mask(tok, messages) == (full, mask)
    plain = tok.encode("Plain text is trained on in full.", add_special_tokens=False)
    expected_tokens += plain + [0]
    expected_mask += [1] * len(plain) + [0]
    tokens, mask = whole(ShardSplit(tmp_path / "s", "train"))
    assert tokens.tolist() == expected_tokens
    assert mask.dtype == np.bool_ and mask.astype(int).tolist() == expected_mask
    # read as text: exactly each assistant reply and its end-of-turn token
    targets, run = [], []
    for t, m in zip(tokens.tolist(), mask.tolist()):
        if m:
            run.append(t)
        elif run:
            targets.append(tok.decode(run, skip_special_tokens=False))
            run = []
    replies = [m["content"] + "<|im_end|>" for c in CHATS for m in c if m["role"] == "assistant"]
    assert targets == replies + ["Plain text is trained on in full."]


def test_sft_needs_a_chat_template(tmp_path, chat_tok):
    from llmos.train.bpe import train_tokenizer

    (tmp_path / "t.txt").write_text(TEXT)
    train_tokenizer([tmp_path / "t.txt"], 300, tmp_path / "plain")
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CHATS[1]}) + "\n")
    with pytest.raises(DataError, match="needs a tokenizer with a chat template.*--chat-tokens"):
        prepare_shards([tmp_path / "c.jsonl"], tmp_path / "s", Tokenizer.from_dir(tmp_path / "plain"), kind="sft",
                       seq_len=4, progress=False)


def test_sft_conversation_without_assistant_and_broken_templates(tmp_path, chat_tok):
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CHATS[1]}) + "\n"
                                      + json.dumps({"messages": CHATS[1][:1]}) + "\n")
    tok = Tokenizer.from_dir(chat_tok)
    with pytest.raises(DataError, match=r"c.jsonl:2: the conversation has no assistant message"):
        prepare_shards([tmp_path / "c.jsonl"], tmp_path / "s", tok, kind="sft", seq_len=4, progress=False)
    # a template that renders earlier turns differently once an answer follows breaks the prefix property
    config = json.loads((chat_tok / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] + ('!' if loop.last else '') + ': ' + m['content'] "
                               "+ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    broken = Tokenizer(tok.backend, config)
    with pytest.raises(DataError, match="not prefix-consistent at assistant message 1"):
        sft_mask(broken, CHATS[1], "c.jsonl:1")
    config["chat_template"] = "{{ raise_exception('no system messages') }}"
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template rejected the messages: no system"):
        prepare_shards([tmp_path / "c.jsonl"], tmp_path / "s", Tokenizer(tok.backend, config), kind="sft",
                       seq_len=4, progress=False)


# ---- bounded streaming, reuse, crash safety ------------------------------------------------------


def test_many_files_stream_in_bounded_batches_into_many_shards(tmp_path, tok, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(300):
        (data / f"{i:03d}.txt").write_text(f"File {i}. " + TEXT[: 60 + i % 50])
    yielded = {"n": 0}
    real_iter = shards.iter_documents

    def counting_iter(*args, **kwargs):
        for doc in real_iter(*args, **kwargs):
            yielded["n"] += 1
            yield doc

    calls = []
    real_encode = tok.encode_batch

    def spy_encode(texts, add_special_tokens=True):
        calls.append((len(texts), yielded["n"]))
        return real_encode(texts, add_special_tokens=add_special_tokens)

    monkeypatch.setattr(shards, "iter_documents", counting_iter)
    monkeypatch.setattr(tok, "encode_batch", spy_encode)
    manifest = prepare_shards([data], tmp_path / "s", tok, seq_len=8, val_fraction=0.05, shard_tokens=128,
                              batch_documents=8, progress=False)
    assert max(n for n, _ in calls) <= 8 and len(calls) == math.ceil(300 / 8)
    assert all(seen <= 8 * (k + 1) for k, (_, seen) in enumerate(calls))  # never reads ahead of one batch
    files = manifest["splits"]["train"]
    assert len(files) == math.ceil(manifest["tokens"]["train"] / 128) > 50
    assert all(e["tokens"] == 128 for e in files[:-1]) and manifest["tokens"]["val"] > 0
    stream = stream_of(tok, [(data / f"{i:03d}.txt").read_text() for i in range(300)])
    assert manifest["tokens"]["train"] + manifest["tokens"]["val"] == len(stream)


def test_prepared_dir_is_reused_and_rebuilt_when_inputs_change(tmp_path, tok, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXT * 2)
    args = ([tmp_path / "a.txt"], tmp_path / "s", tok)
    first = prepare_shards(*args, seq_len=8, val_fraction=0.1, progress=False)
    monkeypatch.setattr(shards, "_write_batch", lambda *a: pytest.fail("re-tokenized a prepared directory"))
    assert prepare_shards(*args, seq_len=8, val_fraction=0.1, progress=False) == first
    monkeypatch.undo()
    second = prepare_shards(*args, seq_len=8, val_fraction=0.0, progress=False)  # another setting
    assert second["fingerprint"] != first["fingerprint"] and first["tokens"]["val"] > 0 == second["tokens"]["val"]
    (tmp_path / "a.txt").write_text(TEXT * 3)  # the input changed
    third = prepare_shards(*args, seq_len=8, val_fraction=0.0, progress=False)
    assert third["tokens"]["train"] > second["tokens"]["train"]
    (tmp_path / "s" / third["splits"]["train"][0]["file"]).write_bytes(b"")  # a damaged shard is rebuilt
    assert prepare_shards(*args, seq_len=8, val_fraction=0.0, progress=False)["fingerprint"] == third["fingerprint"]
    assert len(ShardSplit(tmp_path / "s", "train")) == third["tokens"]["train"]


def test_a_failed_preparation_leaves_no_manifest_and_no_files(tmp_path, tok, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXT * 4)
    good = prepare_shards([tmp_path / "a.txt"], tmp_path / "s", tok, seq_len=8, progress=False)
    assert good["tokens"]["train"] > 0

    def crash(*args):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the shard files, before the manifest

    monkeypatch.setattr(shards, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards([tmp_path / "a.txt"], tmp_path / "s", tok, seq_len=4, progress=False)
    assert list((tmp_path / "s").iterdir()) == []  # the old manifest went first, then every file
    with pytest.raises(DataError, match="no prepared token shards"):
        ShardSplit(tmp_path / "s", "train")
    monkeypatch.undo()
    # a killed run (files, no manifest) is never read, and the next preparation rebuilds it
    (tmp_path / "s" / "train-00000.bin").write_bytes(b"\x01\x00" * 9)
    with pytest.raises(DataError, match="no prepared token shards"):
        ShardSplit(tmp_path / "s", "train")
    prepare_shards([tmp_path / "a.txt"], tmp_path / "s", tok, seq_len=8, progress=False)
    assert len(ShardSplit(tmp_path / "s", "train")) == good["tokens"]["train"]


def test_bad_line_mid_stream_cleans_up(tmp_path, tok):
    (tmp_path / "d.jsonl").write_text("".join(
        json.dumps({"text": TEXT + str(i)}) + "\n" for i in range(50)) + "{oops\n")
    with pytest.raises(DataError, match=r"d.jsonl:51 is not valid JSON"):
        prepare_shards([tmp_path / "d.jsonl"], tmp_path / "s", tok, seq_len=4, shard_tokens=64,
                       batch_documents=4, progress=False)
    assert not (tmp_path / "s").exists()


def test_refuses_a_directory_of_other_files_and_reads_truncated_shards_as_errors(tmp_path, tok):
    (tmp_path / "a.txt").write_text(TEXT * 2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.doc").write_text("precious")
    with pytest.raises(DataError, match="not token shards.*thesis.doc"):
        prepare_shards([tmp_path / "a.txt"], tmp_path / "mine", tok, seq_len=8, progress=False)
    assert (tmp_path / "mine" / "thesis.doc").read_text() == "precious"
    m = prepare_shards([tmp_path / "a.txt"], tmp_path / "s", tok, seq_len=8, progress=False)
    with open(tmp_path / "s" / m["splits"]["train"][0]["file"], "r+b") as f:
        f.truncate(4)
    with pytest.raises(DataError, match="missing or truncated"):
        ShardSplit(tmp_path / "s", "train")
    prepare_shards([tmp_path / "a.txt"], tmp_path / "s", tok, seq_len=8, progress=False)  # rebuilt
    with pytest.raises(DataError, match="no 'test' split"):
        ShardSplit(tmp_path / "s", "test")


def test_document_separator_choice():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from llmos.train.shards import separator_id

    backend = lambda: HFTokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2}, unk_token="a"))  # noqa: E731
    assert separator_id(Tokenizer(backend(), {"bos_token": "<s>", "eos_token": "</s>"})) == 0  # Llama: BOS
    assert separator_id(Tokenizer(backend(), {"eos_token": "</s>"})) == 1
    with pytest.raises(DataError, match="no <\\|endoftext\\|>, BOS or EOS token"):
        separator_id(Tokenizer(backend(), {}))


def test_sigkill_before_the_manifest_leaves_an_unused_dir_that_is_rebuilt(tmp_path, chat_tok):
    import os
    import subprocess
    import sys

    (tmp_path / "a.txt").write_text(TEXT * 6)
    script = (
        "import os, signal, sys\n"
        "import llmos.train.shards as s\n"
        "from llmos.model.tokenizer import Tokenizer\n"
        "s._write_manifest = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "s.prepare_shards([sys.argv[1]], sys.argv[2], Tokenizer.from_dir(sys.argv[3]), seq_len=8, shard_tokens=32,"
        " progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a.txt"), str(tmp_path / "s"), str(chat_tok)],
                          env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    left = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert "train-00000.bin" in left and "manifest.json" not in left  # killed after the shards, before the manifest
    with pytest.raises(DataError, match="no prepared token shards"):
        ShardSplit(tmp_path / "s", "train")
    manifest = prepare_shards([tmp_path / "a.txt"], tmp_path / "s", Tokenizer.from_dir(chat_tok), seq_len=8,
                              shard_tokens=32, progress=False)
    assert len(ShardSplit(tmp_path / "s", "train")) == manifest["tokens"]["train"] > 0
