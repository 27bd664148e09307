"""Tokenizer, chat templates and incremental detokenization, checked against transformers."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from llmos.errors import InvalidRequestError, ModelLoadError
from llmos.model.tokenizer import PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer, Tokenizer

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Large language models predict the next token, one token at a time.",
    "您好，欢迎来到大语言模型操作系统！",
    "今天天气很好，我们去公园散步吧。",
    "Robots 🤖 and rockets 🚀 get a thumbs up 👍🏽 from everyone.",
    "def main():\n    print('hi')  # code too",
]
TEXTS = [
    "",
    "Hello world!",
    "  leading spaces and\ttabs\nnew lines",
    "您好，欢迎来到大语言模型操作系统！",
    "混合 mixed 文本 with emoji 🤖🚀👍🏽 and 龘 (rare) ✨",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "a <|endoftext|> b",
]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "您好！Who are you? 🤖"},
    {"role": "assistant", "content": "I am llmos 🚀"},
    {"role": "user", "content": "  Tell me more.  "},
]

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = """{% set loop_messages = messages %}
{% for message in loop_messages %}
    {% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}
    {% if loop.index0 == 0 %}
        {% set content = bos_token + content %}
    {% endif %}
    {{ content }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{% endif %}
{{ '' if strftime_now('%Y') else raise_exception('no clock') }}"""


def train_byte_level_bpe(special_tokens: list[str], vocab_size: int = 400) -> HFTokenizer:
    """A tiny byte-level BPE: most CJK characters and all emoji stay split across several tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_model_dir(path, tok: HFTokenizer, config: dict, generation_config: dict | None = None):
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """ChatML like Qwen2: no BOS, <|im_end|> as EOS, <|endoftext|> added by generation_config."""
    tok = train_byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN2_TEMPLATE}
    generation = {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}
    return write_model_dir(tmp_path_factory.mktemp("m") / "qwen", tok, config, generation)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Llama-3 style: BOS added by the post-processor, tokens as AddedToken dicts, a list of templates."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = train_byte_level_bpe(specials)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    config = {
        "bos_token": {"__type": "AddedToken", "content": bos, "special": True},
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
        "chat_template": [
            {"name": "default", "template": LLAMA3_TEMPLATE},
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
        ],
    }
    return write_model_dir(tmp_path_factory.mktemp("m") / "llama", tok, config, {"eos_token_id": 1})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base model: no template, no post-processor, BOS not in the vocab, `add_bos_token` (ignored)."""
    tok = train_byte_level_bpe(["<unk>"])
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    return write_model_dir(tmp_path_factory.mktemp("m") / "base", tok, config)


@pytest.fixture(scope="module", params=["qwen_dir", "llama_dir", "base_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def pair(model_dir):
    """(ours, the transformers oracle) for the same directory."""
    return Tokenizer.from_dir(model_dir), AutoTokenizer.from_pretrained(str(model_dir))


# ---- encode / decode / special tokens -------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    ours, oracle = pair
    for text in TEXTS:
        expected = oracle(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=30))
def test_encode_decode_match_transformers_on_any_text(qwen_dir, text):
    ours, oracle = _cached_pair(qwen_dir)
    ids = ours.encode(text)
    assert ids == oracle(text)["input_ids"]
    assert ours.decode(ids) == oracle.decode(ids, skip_special_tokens=True) == text


_PAIRS = {}


def _cached_pair(path):
    if path not in _PAIRS:
        _PAIRS[path] = (Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(str(path)))
    return _PAIRS[path]


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(pair, skip):
    ours, oracle = pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=skip) == oracle.decode(ids, skip_special_tokens=skip)


def test_special_token_ids_match_transformers(pair):
    ours, oracle = pair
    assert ours.bos_token_id == oracle.bos_token_id
    assert ours.pad_token_id == oracle.pad_token_id
    assert ours.eos_token_ids[0] == oracle.eos_token_id
    assert ours.vocab_size == len(oracle)


def test_generation_config_adds_eos_ids(qwen_dir, llama_dir):
    qwen = Tokenizer.from_dir(qwen_dir)
    ids = [qwen.encode(t, add_special_tokens=False)[0] for t in ("<|im_end|>", "<|endoftext|>")]
    assert qwen.eos_token_ids == ids
    llama = Tokenizer.from_dir(llama_dir)
    assert llama.eos_token_ids == [llama.encode("<|eot_id|>", add_special_tokens=False)[0], 1]
    assert llama.encode("hi")[0] == llama.bos_token_id


def test_save_round_trip(pair, tmp_path):
    ours, _ = pair
    ours.save(tmp_path)
    again, oracle = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text) == oracle(text)["input_ids"]
    assert again.chat_template == ours.chat_template
    assert again.apply_chat_template(MESSAGES) == ours.apply_chat_template(MESSAGES)


# ---- load errors ----------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json not found.*Copy"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_files(qwen_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": "not a tokenizer"')
    with pytest.raises(ModelLoadError, match="tokenizer.json is corrupt.*download it again"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((qwen_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)


# ---- chat templates -------------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:2], [{"role": "user", "content": "hi", "name": None}]])
def test_chat_template_matches_transformers(qwen_dir, llama_dir, messages, add_generation_prompt):
    for path in (qwen_dir, llama_dir):
        ours, oracle = _cached_pair(path)
        assert ours.has_chat_template
        expected = oracle.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_file_overrides_config(qwen_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((qwen_dir / name).read_text())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    ours, oracle = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.apply_chat_template(MESSAGES) == oracle.apply_chat_template(MESSAGES, tokenize=False)


def test_plain_fallback_without_template(base_dir):
    tok = Tokenizer.from_dir(base_dir)
    assert not tok.has_chat_template
    assert tok.apply_chat_template(MESSAGES[:2]) == (
        "System: You are a helpful assistant.\nUser: 您好！Who are you? 🤖\nAssistant:"
    )
    assert tok.apply_chat_template(MESSAGES[1:2], add_generation_prompt=False) == "User: 您好！Who are you? 🤖"


def _with_template(path, template) -> Tokenizer:
    tok = Tokenizer.from_dir(path)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% if messages[0].role != 'system' %}{{ raise_exception('roles must alternate') }}{% endif %}",
         "rejected the messages: roles must alternate"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "escape its sandbox"),
        ("{% set _ = messages.append({'role': 'x'}) %}", "escape its sandbox"),
        ("{% set ns = namespace(_x=1) %}", "escape its sandbox"),
        ("{% set ns = namespace(n=0) %}{% set ns.__class__ = 1 %}", "escape its sandbox"),
        ("{% for m in messages %}{{ m.content }", "syntax error"),
        ("{{ messages[0].content + 1 }}", "failed to render .*TypeError"),
    ],
)
def test_bad_templates_raise_invalid_request(qwen_dir, template, message):
    tok = _with_template(qwen_dir, template)
    with pytest.raises(InvalidRequestError, match=message):
        tok.apply_chat_template(MESSAGES[1:2])


def test_bad_messages_raise_invalid_request(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    for messages in ([], "hi", [{"content": "no role"}]):
        with pytest.raises(InvalidRequestError, match="message"):
            tok.apply_chat_template(messages)


def test_template_globals_and_loop_controls(qwen_dir):
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
        "{% generation %}{{ tools }}|{{ strftime_now('%Y')|length }}{% endgeneration %}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    )
    tok, (_, oracle) = _with_template(qwen_dir, template), _cached_pair(qwen_dir)
    expected = oracle.apply_chat_template(MESSAGES, chat_template=template, tokenize=False)
    assert tok.apply_chat_template(MESSAGES) == expected
    assert "您好" in expected  # tojson keeps non-ASCII characters


# ---- incremental detokenization -------------------------------------------------------------------


def stream(tok: Tokenizer, prompt_ids: list[int], output_ids: list[int], **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, **kwargs)
    deltas = [detok.step(token_id) for token_id in output_ids]
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", TEXTS[3:] + ["🤖🚀👍🏽" * 3, "龘龘 😀 ok"])
def test_incremental_deltas_are_clean_and_complete(qwen_dir, text):
    tok = Tokenizer.from_dir(qwen_dir)
    prompt = tok.encode("您好 prompt 🤖")
    output = tok.encode(text, add_special_tokens=False)
    deltas = stream(tok, prompt, output)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tok.decode(output)


def test_split_characters_are_held_back(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    output = tok.encode("🤖🚀👍🏽 龘", add_special_tokens=False)
    assert len(output) > len("🤖🚀👍🏽 龘")  # byte-level tokens split the characters
    deltas = stream(tok, [], output)
    assert "" in deltas[:-1]
    assert [d for d in deltas if d][:2] == ["🤖", "🚀"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(alphabet=st.sampled_from(list("ab 您好，欢迎来到龘！🤖🚀👍🏽✨\n")), max_size=25),
    prompt=st.text(alphabet=st.sampled_from(list("xy 模型😀")), max_size=8),
)
def test_incremental_matches_full_decode_property(qwen_dir, text, prompt):
    tok, _ = _cached_pair(qwen_dir)
    output = tok.encode(text, add_special_tokens=False)
    deltas = stream(tok, tok.encode(prompt), output)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tok.decode(output) == text


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 399), max_size=20), skip=st.booleans())
def test_incremental_on_arbitrary_ids_matches_decode(qwen_dir, ids, skip):
    """Random ids give invalid byte sequences too: the deltas still add up to the full decode."""
    tok, _ = _cached_pair(qwen_dir)
    deltas = stream(tok, [], ids, skip_special_tokens=skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert all(not d.endswith("\ufffd") for d in deltas[:-1])


def test_special_tokens_kept_when_not_skipped(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    output = tok.encode("hi<|im_end|>", add_special_tokens=False)
    assert "".join(stream(tok, [], output, skip_special_tokens=False)) == "hi<|im_end|>"
    assert "".join(stream(tok, [], output)) == "hi"


def test_per_step_decode_window_stays_small(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    lengths = []
    decode = tok.decode

    def spy(ids, skip_special_tokens=True):
        lengths.append(len(ids))
        return decode(ids, skip_special_tokens)

    tok.decode = spy
    output = tok.encode("您好，欢迎来到大语言模型操作系统！🤖🚀👍🏽 " * 20, add_special_tokens=False)
    prompt = tok.encode("a long prompt " * 50)
    deltas = stream(tok, prompt, output)
    assert len(output) > 300
    assert max(lengths) <= PROMPT_CONTEXT_TOKENS + 8  # a window, never the whole sequence
    assert "".join(deltas) == decode(output)
