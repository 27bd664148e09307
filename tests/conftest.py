"""Shared fixtures: tiny random checkpoints with a real byte-level BPE tokenizer, built in the test run."""

import json

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "您好，欢迎来到大语言模型操作系统！ 🤖🚀👍🏽 The quick brown fox jumps over the lazy dog.",
    "def main():\n    print('hello, world')\n",
] * 20


def make_tokenizer_dir(path, vocab_size=300):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>", "model_max_length": 256}))
    return tok.get_vocab_size()


def make_model_dir(path, family="llama", seed=0, max_positions=256):
    vocab = make_tokenizer_dir(path)
    small = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=0)
    cfg = {"llama": lambda: T.LlamaConfig(**small, num_key_value_heads=2),
           "qwen2": lambda: T.Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=True),
           "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=max_positions,
                                        bos_token_id=0, eos_token_id=0)}[family]()
    torch.manual_seed(seed)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama with random weights and a 300-token byte-level BPE tokenizer."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def model_factory():
    """`make_model_dir` for tests that need a second checkpoint (no `from conftest import`: names clash)."""
    return make_model_dir


@pytest.fixture
def one_thread():
    """One CPU thread for the test (torch's intra-op pool), restored afterwards: the machine is shared, and
    single-threaded results are reproducible. Modules use it with `pytestmark = pytest.mark.usefixtures(...)`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
