"""Fixtures shared by the fine-tuning and classification tests."""

import pytest


@pytest.fixture(scope="module")
def bases(tmp_path_factory, model_factory):
    """Tiny random checkpoints written by transformers, one per family."""
    return {family: model_factory(tmp_path_factory.mktemp(family), family=family, max_positions=64)
            for family in ("llama", "qwen2", "gpt2")}
