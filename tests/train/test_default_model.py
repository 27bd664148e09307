"""The bundled default model matches its model card (rebuild it with scripts/make_default_model.sh)."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

import pytest

from llmos.model.loader import load_model
from llmos.model.tokenizer import Tokenizer
from llmos.train.evaluate import perplexity

MODEL_DIR = Path(str(importlib.resources.files("llmos") / "assets" / "default-model"))


def card_value(name: str) -> str:
    card = (MODEL_DIR / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^{name}: (\S+)$", card, flags=re.MULTILINE)
    assert match, f"the model card has no '{name}: ...' line"
    return match.group(1)


@pytest.fixture(scope="module")
def default_model():
    assert (MODEL_DIR / "model.safetensors").is_file(), f"{MODEL_DIR} is missing; run scripts/make_default_model.sh"
    model, config = load_model(MODEL_DIR)
    return model, config, Tokenizer.from_dir(MODEL_DIR)


def test_heldout_perplexity_matches_the_card(default_model):
    model, config, tokenizer = default_model
    text = (MODEL_DIR / "heldout.txt").read_text(encoding="utf-8")
    assert 2_000 <= len(text.encode()) <= 60_000
    measured = perplexity(model, tokenizer, text, config.max_position_embeddings)
    stated = float(card_value("heldout_perplexity"))
    assert abs(measured - stated) / stated < 0.02, f"measured {measured:.2f}, card says {stated}"


def test_parameter_count_and_size_match_the_card(default_model):
    model, config, _ = default_model
    counted = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied weights once
    assert counted == int(card_value("parameters")) == config.num_parameters()
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 10**6
