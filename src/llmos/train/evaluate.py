"""Perplexity of a causal language model on a text: the number the default model's card reports.

Owns the evaluation procedure. Never trains and never changes the model.

Procedure (documented so the number can be reproduced with any framework):
1. ids = [BOS] + tokenizer.encode(text, add_special_tokens=False); BOS is the tokenizer's
   `bos_token_id` (for llmos checkpoints `<|endoftext|>`, what precedes every training document),
   omitted if the tokenizer has none.
2. Cut ids into non-overlapping windows: window w holds ids[w*T : w*T + T + 1] (T = seq_len), so
   every token after the first is predicted exactly once, from the tokens before it in its window
   (context restarts at each window; no carry-over).
3. perplexity = exp(sum of the negative log-likelihoods / number of predicted tokens), natural log.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def encode_for_eval(tokenizer, text: str) -> list[int]:
    """Step 1 above. `tokenizer`: llmos `Tokenizer`, a `transformers` tokenizer or a `tokenizers.Tokenizer`."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids = list(getattr(ids, "ids", ids))
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + ids


@torch.no_grad()
def negative_log_likelihood(model, ids: list[int], seq_len: int, batch_size: int = 16) -> tuple[float, int]:
    """Sum of NLL (nats) and number of predicted tokens over non-overlapping windows (step 2 above).

    `model(input_ids [B, T]) -> logits [B, T, vocab]`. Windows of equal length are batched.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    windows = [ids[i:i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
    total, count = 0.0, 0
    full = [w for w in windows if len(w) == seq_len + 1]
    rest = [w for w in windows if len(w) != seq_len + 1]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in rest]
    for group in groups:
        batch = torch.tensor(group, dtype=torch.long)
        logits = model(batch[:, :-1]).float()
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total, count


def perplexity(model, tokenizer, text: str, seq_len: int) -> float:
    """Perplexity of `model` on `text` by the procedure in the module docstring (lower is better).

    Raises `ValueError` if the text has fewer than two tokens (nothing to predict).
    """
    ids = encode_for_eval(tokenizer, text)
    if len(ids) < 2:
        raise ValueError("the text is too short to measure perplexity: it needs at least two tokens.")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        nll, count = negative_log_likelihood(model, ids, seq_len)
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> None:
    """`python -m llmos.train.evaluate MODEL_DIR TEXT_FILE [--seq-len T]`: print the perplexity."""
    import argparse

    from llmos.model.loader import load_model
    from llmos.model.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description="Perplexity of a checkpoint on a text file.")
    parser.add_argument("model_dir")
    parser.add_argument("text_file")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: max_position_embeddings)")
    args = parser.parse_args(argv)
    model, config = load_model(args.model_dir)
    tokenizer = Tokenizer.from_dir(args.model_dir)
    text = open(args.text_file, encoding="utf-8").read()
    seq_len = args.seq_len or config.max_position_embeddings
    print(f"{perplexity(model, tokenizer, text, seq_len):.4f}")


if __name__ == "__main__":
    main()
