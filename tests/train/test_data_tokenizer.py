"""llmos.train.bpe: streaming tokenizer training from every source format, vocabulary checks, chat tokens
with a ChatML template that llmos and transformers render alike, and reuse of a tokenizer.json."""

from __future__ import annotations

import json

import pytest

from llmos.errors import DataError
from llmos.model.tokenizer import Tokenizer
from llmos.train.bpe import (CHAT_TOKENS, load_tokenizer, min_vocab_size, prepare_tokenizer, special_tokens_for,
                             train_tokenizer)

TEXT = "In the beginning God created the heaven and the earth. And God said, Let there be light.\n"
CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Who said it?"},
        {"role": "assistant", "content": "God said, Let there be light."},
        {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "There was light."}]


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text(TEXT * 4)
    (tmp_path / "data" / "chats.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    (tmp_path / "data" / "rows.csv").write_text("text,label\nzyzzyva zyzzyva zyzzyva,1\nzyzzyva again,0\n")
    return tmp_path / "data"


def test_trains_on_every_format_streaming(corpus, tmp_path):
    tok = train_tokenizer([corpus], 400, tmp_path / "tok")
    vocab = tok.get_vocab()
    assert "zy" in vocab or "Ġzy" in vocab  # merges learned from the CSV rows
    assert "ĠGod" in vocab  # and from the text file
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|im_start|>") is None
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]  # no temporary files left


def test_vocabulary_below_bytes_plus_specials_names_the_minimum(corpus, tmp_path):
    assert min_vocab_size(special_tokens_for(chat_tokens=True)) == 259
    with pytest.raises(DataError, match=r"--vocab-size 258 is too small.*at least 259 \(256 bytes \+ 3 special"):
        train_tokenizer([corpus], 258, tmp_path / "tok", chat_tokens=True)
    with pytest.raises(DataError, match="at least 257"):
        prepare_tokenizer([corpus], tmp_path / "tok", vocab_size=100)
    assert not (tmp_path / "tok").exists()  # refused before any work
    train_tokenizer([corpus], 259, tmp_path / "tok", chat_tokens=True)  # the minimum itself is fine


def test_chat_tokens_and_template_render_alike_in_llmos_and_transformers(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = prepare_tokenizer([corpus], tmp_path / "tok", vocab_size=320, chat_tokens=True, model_max_length=64)
    assert [ours.backend.token_to_id(t) for t in ("<|endoftext|>", *CHAT_TOKENS)] == [0, 1, 2]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    for messages in (CHAT, CHAT[:2], CHAT[1:3]):
        for generation_prompt in (False, True):
            text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
            assert text == hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.apply_chat_template(CHAT[1:3], add_generation_prompt=False) == (
        "<|im_start|>user\nWho said it?<|im_end|>\n<|im_start|>assistant\nGod said, Let there be light.<|im_end|>\n")
    assert ours.apply_chat_template(CHAT[1:2]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert hf.eos_token == "<|im_end|>" and ours.eos_token_ids == [2]  # a chat model stops at the end of its turn
    assert hf.bos_token == "<|endoftext|>" and ours.bos_token_id == 0
    assert ours.encode("light")[0] == 0 == hf("light")["input_ids"][0]  # BOS still prepended
    assert hf.model_max_length == 64
    assert ours.encode_batch(["light", "God"], add_special_tokens=False) == [
        ours.encode("light", add_special_tokens=False), ours.encode("God", add_special_tokens=False)]


def test_reuse_an_existing_tokenizer(corpus, tmp_path):
    train_tokenizer([corpus], 300, tmp_path / "first")
    vocab = json.loads((tmp_path / "first" / "tokenizer.json").read_text())["model"]["vocab"]
    for source in (tmp_path / "first", tmp_path / "first" / "tokenizer.json"):
        tok = prepare_tokenizer([corpus], tmp_path / "again", vocab_size=5000, tokenizer=source)
        assert json.loads((tmp_path / "again" / "tokenizer.json").read_text())["model"]["vocab"] == vocab
        assert tok.vocab_size == len(vocab) and not tok.has_chat_template
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        load_tokenizer(tmp_path / "bad")


def test_reuse_with_chat_tokens_adds_them_once(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    train_tokenizer([corpus], 300, tmp_path / "plain")
    base = Tokenizer.from_dir(tmp_path / "plain").vocab_size
    tok = prepare_tokenizer([corpus], tmp_path / "chat", vocab_size=300, tokenizer=tmp_path / "plain", chat_tokens=True)
    assert tok.vocab_size == base + 2 and tok.has_chat_template
    again = load_tokenizer(tmp_path / "chat", chat_tokens=True)  # already has a template: unchanged
    assert again.vocab_size == tok.vocab_size
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "chat")
    assert hf.apply_chat_template(CHAT, tokenize=False) == again.apply_chat_template(CHAT, add_generation_prompt=False)
    assert len(hf) == tok.vocab_size
