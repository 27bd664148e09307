"""Text classification from a labelled CSV (`text,label`) with a language model: a trained classification
head (full fine-tuning or LoRA), or zero-shot label scoring; accuracy and a confusion matrix on a held-out split.

Owns the CSV reading, the stratified split, the classifier, its report and its Hugging Face
`*ForSequenceClassification` checkpoint. Never defines the language model (llmos.model) nor LoRA (finetune.py).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmos.errors import DataError, InvalidRequestError, ModelLoadError, TrainingDivergedError, UnsupportedModelError
from llmos.model.config import ModelConfig
from llmos.model.loader import check_checkpoint_target, save_model
from llmos.model.tokenizer import Tokenizer
from llmos.model.transformer import GPT2LMHeadModel, LlamaForCausalLM
from llmos.train.finetune import finalize_model, is_lora, load_base, prepare_model, trainable_parameters, unwrap

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "default-model"
DEFAULT_DATASET = ASSETS / "datasets" / "kjv-genre.csv"
ZERO_SHOT_TEMPLATE = "{text}\nLabel: {label}"  # scored: the tokens of " {label}" after "{text}\nLabel:"
REPORT_FILES = ("metrics.json", "metrics.jsonl", "predictions.csv", "confusion.png", "config.yaml", "progress.json")
HF_CLASSIFIERS = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                  "mistral": "MistralForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}


# ---- data ------------------------------------------------------------------------------------------


def read_labelled_csv(paths: str | Path | list, text_column: str = "text", label_column: str = "label"
                      ) -> tuple[list[str], list[str]]:
    """(texts, labels) from one or more UTF-8 CSV files with a header row (RFC 4180 quoting; extra columns
    are ignored). Raises `DataError` for a missing, empty, binary or non-UTF-8 file, a missing column (the
    message lists the columns present), a row with an empty text or label, or fewer than 2 distinct labels.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise DataError("--task classify needs --data FILE.csv with a text and a label column.")
    texts, labels = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path} does not exist or is not a file; pass --data FILE.csv.")
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path} is not a .csv file; --task classify reads a CSV file with a header row "
                            f"({text_column},{label_column}).")
        raw = path.read_bytes()
        if b"\x00" in raw[:8192]:
            raise DataError(f"{path} looks binary (it holds NUL bytes); --task classify reads a UTF-8 CSV file.")
        try:
            content = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 ({e}); convert it, e.g. with `iconv -f latin1 -t utf-8`.") from None
        if not content.strip():
            raise DataError(f"{path} is empty; it needs a header row ({text_column},{label_column}) and labelled rows.")
        reader = csv.DictReader(io.StringIO(content, newline=""))
        columns = reader.fieldnames or []
        for name, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if name not in columns:
                raise DataError(f"{path} has no column {name!r}; its columns are {', '.join(map(repr, columns))}. "
                                f"Name the right one with {flag}.")
        rows = 0
        try:
            for row in reader:
                text, label = (row.get(text_column) or "").strip(), (row.get(label_column) or "").strip()
                if not text or not label:
                    what = "text" if not text else "label"
                    raise DataError(f"{path} line {reader.line_num}: the {what} is empty; fill it in or remove "
                                    "the row.")
                texts.append(text)
                labels.append(label)
                rows += 1
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num} is not valid CSV ({e}).") from None
        if rows == 0:
            raise DataError(f"{path} has a header but no rows; add labelled rows ({text_column},{label_column}).")
    distinct = sorted(set(labels))
    if len(distinct) < 2:
        raise DataError(f"--task classify needs at least 2 labels; the data has only {distinct!r} "
                        f"(column {label_column!r}).")
    return texts, labels


def stratified_split(labels: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices: of each label's n rows, round(n * val_fraction) (at least 1 when n >= 2,
    never all of them) go to the held-out split, chosen by a numpy generator seeded with `seed`.
    Raises `InvalidRequestError` for `val_fraction` outside (0, 1) and `DataError` if no row can be held out.
    """
    if not 0 < val_fraction < 1:
        raise InvalidRequestError(f"--task classify needs a held-out split: --val-fraction must be in (0, 1), "
                                  f"got {val_fraction}.")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        rows = np.array([i for i, x in enumerate(labels) if x == label])
        rng.shuffle(rows)
        k = min(len(rows) - 1, max(1, round(len(rows) * val_fraction))) if len(rows) >= 2 else 0
        val += rows[:k].tolist()
        train += rows[k:].tolist()
    if not val:
        raise DataError("no row can be held out for evaluation: every label has a single example; add data.")
    return sorted(train), sorted(val)


# ---- the model -------------------------------------------------------------------------------------


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The language model's last hidden states after its final norm, `[B, T, hidden]`, for `input_ids [B, T]`
    (dense causal pass; a LoRA wrapper's adapters take part). Raises `UnsupportedModelError` for a model
    that is not a llmos transformer (Llama or GPT-2 family)."""
    m = unwrap(model)
    if isinstance(m, LlamaForCausalLM):
        x = m.model.embed_tokens(input_ids)
        cos, sin = m.rope(torch.arange(input_ids.shape[1], device=input_ids.device), x.dtype)
        for layer in m.model.layers:
            x = layer(x, cos, sin)
        return m.model.norm(x)
    if isinstance(m, GPT2LMHeadModel):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = m.transformer.wte(input_ids) + m.transformer.wpe(pos)
        for block in m.transformer.h:
            x = block(x)
        return m.transformer.ln_f(x)
    raise UnsupportedModelError(f"--task classify runs on transformer language models (llama, qwen2, mistral, "
                                f"gpt2), not {type(m).__name__}.")


class SequenceClassifier(nn.Module):
    """A language model with a linear head on the hidden state of each text's last token, as transformers'
    `LlamaForSequenceClassification` / `GPT2ForSequenceClassification` pool (last-token pooling: with causal
    attention the last token is the only one that has seen the whole text).

    `forward(input_ids [B, T], lengths [B]) -> logits [B, num_labels]`; rows are right-padded, and since
    attention is causal the padding never reaches position `lengths - 1`, so no attention mask is needed.
    `score` is `Linear(hidden, num_labels, bias=False)`, initialised normal(0, 0.02) like transformers.
    """

    def __init__(self, lm: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.lm = lm
        self.score = nn.Linear(unwrap(lm).config.hidden_size, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = final_hidden_states(self.lm, input_ids)
        pooled = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), lengths - 1]
        return self.score(pooled.to(self.score.weight.dtype))


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_len: int, pad_id: int) -> list[list[int]]:
    """Token ids per text: `tokenizer.encode` (with its special tokens, e.g. BOS), cut to `max_len`, trailing
    `pad_id` tokens dropped (transformers pools the last token that is not `pad_id`), at least one token kept."""
    out = []
    for text in texts:
        ids = tokenizer.encode(text)[:max_len] or [pad_id]
        while len(ids) > 1 and ids[-1] == pad_id:
            ids.pop()
        out.append(ids)
    return out


def pad_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: (input_ids [B, T] int64, lengths [B] int64)."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, lengths


# ---- zero-shot ---------------------------------------------------------------------------------------


@torch.no_grad()
def zero_shot_scores(model: nn.Module, tokenizer: Tokenizer, texts: list[str], labels: list[str], max_len: int,
                     batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Label log-likelihoods under the template `ZERO_SHOT_TEMPLATE`: for each text and label,
    log P(" {label}" tokens | "{text}\\nLabel:") summed over the label's tokens (nats); the prompt starts
    with the special tokens `tokenizer.encode` adds (BOS for the default model).

    Returns (scores [N, L], calibrated [N, L]); calibrated is batch calibration (Zhou et al. 2023, "Batch
    Calibration: Rethinking Calibration for In-Context Learning"): each label's mean score over the N texts
    is subtracted, removing the model's bias towards some label words without using any label (it
    assumes roughly balanced classes, and a prediction then depends on the other texts). The text is
    cut at its end so that prompt and label fit in `max_len` tokens.
    """
    bos = tokenizer.encode("")  # what the tokenizer puts before a text (e.g. BOS), as encode_texts has it
    cue = tokenizer.encode("\nLabel:", add_special_tokens=False)
    options = [tokenizer.encode(" " + label, add_special_tokens=False) for label in labels]
    longest = max(map(len, options))
    if len(bos) + len(cue) + longest >= max_len:
        raise InvalidRequestError(f"--seq-len {max_len} is too short for the zero-shot prompt and the longest "
                                  f"label ({longest} tokens); raise --seq-len or shorten the labels.")

    def prompt(text: str) -> list[int]:
        ids = tokenizer.encode(text, add_special_tokens=False) if text else []
        return bos + ids[:max_len - len(bos) - len(cue) - longest] + cue

    def score(prompts: list[list[int]]) -> np.ndarray:
        rows, spans = [], []
        for p in prompts:
            for option in options:
                rows.append(p + option)
                spans.append((len(p), len(option)))
        out = []
        step = batch_size * len(options)
        for start in range(0, len(rows), step):
            chunk, chunk_spans = rows[start:start + step], spans[start:start + step]
            ids, _ = pad_batch(chunk, 0)
            logp = torch.log_softmax(model(ids).float(), dim=-1)  # [B, T, V]
            for b, (begin, n) in enumerate(chunk_spans):
                positions = torch.arange(begin - 1, begin - 1 + n)
                out.append(logp[b, positions, ids[b, begin:begin + n]].sum().item())
        return np.array(out).reshape(len(prompts), len(options))

    model.eval()
    scores = score([prompt(t) for t in texts])
    return scores, scores - scores.mean(0, keepdims=True)


# ---- metrics -----------------------------------------------------------------------------------------


def confusion_matrix(true: list[int], pred: list[int], num_labels: int) -> np.ndarray:
    """Counts `[num_labels, num_labels]`: row = true label, column = predicted label."""
    m = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(m, (np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return m


def classification_report(confusion: np.ndarray, names: list[str]) -> dict:
    """Accuracy, per-label precision/recall/F1/support and macro F1 from a confusion matrix."""
    total = int(confusion.sum())
    per_label = {}
    for i, name in enumerate(names):
        tp, predicted, support = confusion[i, i], confusion[:, i].sum(), confusion[i].sum()
        precision = float(tp / predicted) if predicted else 0.0
        recall = float(tp / support) if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[name] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                           "support": int(support)}
    return {"accuracy": float(np.trace(confusion) / total) if total else 0.0,
            "macro_f1": float(np.mean([v["f1"] for v in per_label.values()])), "per_label": per_label,
            "majority_baseline": float(confusion.sum(1).max() / total) if total else 0.0,
            "chance": 1.0 / len(names)}


def plot_confusion(confusion: np.ndarray, names: list[str], title: str, out_png: Path) -> bool:
    """confusion.png (counts in the cells), if matplotlib is installed (the `train` extra). Returns whether written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    size = 2.0 + 0.6 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    top = confusion.max() or 1
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                    color="white" if confusion[i, j] > top / 2 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return True


def print_report(report: dict, names: list[str], confusion: np.ndarray) -> None:
    """A rich table of the confusion matrix and the accuracy, on the console."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out confusion matrix ({report['mode']}; rows: true, columns: predicted)")
    table.add_column("true \\ predicted", style="bold")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("recall", justify="right")
    for i, name in enumerate(names):
        cells = [f"[bold green]{v}[/]" if i == j else str(v) for j, v in enumerate(confusion[i].tolist())]
        table.add_row(name, *cells, f"{report['per_label'][name]['recall']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"accuracy {report['accuracy']:.4f} on {report['val_examples']} held-out rows "
                  f"(chance {report['chance']:.4f}, majority class {report['majority_baseline']:.4f}, "
                  f"macro F1 {report['macro_f1']:.4f})")
    if "batch_calibrated_accuracy" in report:
        console.print(f"batch-calibrated zero-shot accuracy {report['batch_calibrated_accuracy']:.4f}")


# ---- the run -----------------------------------------------------------------------------------------


def run_classify(config: Any) -> dict:
    """`llmos train --task classify`: classify the rows of `config.data` (CSV) and report on a held-out split.

    Reads `text_column`/`label_column`, holds out `val_fraction` of each label (seed `seed`), loads
    `init_from` (default: the bundled default model) and either
    - trains (default): a `SequenceClassifier` head with full fine-tuning (`lora_rank` 0) or LoRA, AdamW
      (lr, betas, weight decay on matrices, linear warmup then cosine decay to min_lr, grad_clip) for
      `max_steps` steps of `batch_size` rows sampled with replacement, texts cut to `seq_len` tokens; or
    - `zero_shot`: no training; predicts the label with the highest likelihood after the prompt
      (`zero_shot_scores`; the batch-calibrated accuracy is reported beside it).
    Writes to `out_dir`, atomically (a temporary directory swapped into place): metrics.json (accuracy,
    confusion matrix, per-label scores), predictions.csv (the held-out rows with their predictions),
    confusion.png (with matplotlib), config.yaml, and when trained metrics.jsonl and a Hugging Face
    `*ForSequenceClassification` checkpoint (`save_classifier`). Prints the confusion matrix when
    `progress` is on. Returns the metrics.json dict.

    Raises `DataError` (bad CSV), `InvalidRequestError` (bad settings), `ModelLoadError` (bad base model or
    `out_dir`), `TrainingDivergedError` (a non-finite loss; nothing saved).
    """
    out_dir = _check_out_dir(getattr(config, "out_dir", "out"))
    texts, labels = read_labelled_csv(getattr(config, "data", []), getattr(config, "text_column", "text"),
                                      getattr(config, "label_column", "label"))
    names = sorted(set(labels))
    label_ids = [names.index(x) for x in labels]
    train_rows, val_rows = stratified_split(labels, getattr(config, "val_fraction", 0.05), config.seed)
    init_from = getattr(config, "init_from", None) or str(DEFAULT_MODEL)
    config = copy.copy(config)  # resolved: config.yaml and the adapter name the model actually used
    config.init_from = init_from
    threads_before = torch.get_num_threads()
    torch.set_num_threads(getattr(config, "num_threads", 0) or os.cpu_count() or 1)
    existed = out_dir.exists()
    try:
        torch.manual_seed(config.seed)
        model, model_config, tokenizer = load_base(config, init_from=init_from)
        max_len = min(config.seq_len, model_config.context_length)
        pad_id = _pad_id(tokenizer, model_config)
        t0 = time.perf_counter()
        base = {"task": "classify", "init_from": str(Path(init_from).absolute()), "labels": names,
                "train_examples": len(train_rows), "val_examples": len(val_rows), "seq_len": max_len,
                "data": [str(Path(p).absolute()) for p in _as_list(config.data)]}
        if getattr(config, "zero_shot", False):
            scores, calibrated = zero_shot_scores(model, tokenizer, [texts[i] for i in val_rows], names, max_len)
            pred = scores.argmax(1).tolist()
            batch = confusion_matrix([label_ids[i] for i in val_rows], calibrated.argmax(1).tolist(), len(names))
            extra = {"mode": "zero-shot", "template": ZERO_SHOT_TEMPLATE,
                     "scoring": "argmax of log P(' {label}' | '{text}\\nLabel:'), summed over the label's tokens",
                     "batch_calibrated_accuracy": float(np.trace(batch) / batch.sum()),
                     "batch_calibrated_confusion": batch.tolist()}
            classifier, history = None, []
        else:
            classifier, history, extra = _train(config, out_dir, model, tokenizer, pad_id, max_len, len(names),
                                                [texts[i] for i in train_rows], [label_ids[i] for i in train_rows],
                                                [texts[i] for i in val_rows], [label_ids[i] for i in val_rows])
            pred = predict(classifier, encode_texts(tokenizer, [texts[i] for i in val_rows], max_len, pad_id), pad_id)
        true = [label_ids[i] for i in val_rows]
        confusion = confusion_matrix(true, pred, len(names))
        report = {**base, **extra, **classification_report(confusion, names), "confusion": confusion.tolist(),
                  "seconds": round(time.perf_counter() - t0, 1)}
        if getattr(config, "progress", True):
            print_report(report, names, confusion)
        files = _ReportFiles(config, report, names, confusion, [(texts[i], labels[i], names[p])
                                                                for i, p in zip(val_rows, pred)], history)
        if classifier is None:
            files.write_dir(out_dir)
        else:
            with _report_dir_aside(out_dir):
                save_classifier(classifier, model_config, tokenizer, names, pad_id, out_dir, extras=files,
                                config=config)
        return report
    except BaseException:  # Ctrl-C, divergence, a full disk: drop this run's progress.json, keep the rest
        if (out_dir / "progress.json").is_file() and not (out_dir / "metrics.json").is_file():
            (out_dir / "progress.json").unlink()
            if not existed and not any(out_dir.iterdir()):
                out_dir.rmdir()
        raise
    finally:
        torch.set_num_threads(threads_before)


def _train(config, out_dir, model, tokenizer, pad_id, max_len, num_labels, train_texts, train_labels, val_texts,
           val_labels):
    from llmos.train.trainer import get_lr, make_optimizer  # trainer dispatches here: import it when called

    classifier = SequenceClassifier(prepare_model(config, model), num_labels)
    train_ids = encode_texts(tokenizer, train_texts, max_len, pad_id)
    val_ids = encode_texts(tokenizer, val_texts, max_len, pad_id)
    opt = make_optimizer(classifier, config)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=getattr(config, "dtype", "float32") == "bfloat16")
    rng = np.random.default_rng(config.seed)
    steps, log_interval = config.max_steps, max(1, getattr(config, "log_interval", 10))
    eval_interval = max(1, getattr(config, "eval_interval", steps))
    history, val_loss, val_acc, t0, tokens = [], None, None, time.perf_counter(), 0
    progress = _progress(getattr(config, "progress", True), steps)
    trainable, total = trainable_parameters(classifier)
    with progress:
        task = progress.add_task("classify", total=steps, loss=float("nan"))
        for step in range(steps):
            lr = get_lr(step, config)
            for group in opt.param_groups:
                group["lr"] = lr
            classifier.train()
            batch = rng.integers(0, len(train_ids), size=config.batch_size)
            ids, lengths = pad_batch([train_ids[i] for i in batch], pad_id)
            with autocast:
                logits = classifier(ids, lengths)
            loss = F.cross_entropy(logits.float(), torch.tensor([train_labels[i] for i in batch]))
            if not math.isfinite(loss.item()):
                raise TrainingDivergedError(f"classification training diverged at step {step + 1} (loss "
                                            f"{loss.item()}); nothing was saved. Lower --lr (now {config.lr}) "
                                            "and run again.")
            loss.backward()
            if getattr(config, "grad_clip", 0) > 0:
                torch.nn.utils.clip_grad_norm_(classifier.parameters(), config.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            train_loss = loss.item()
            tokens += int(lengths.sum())
            progress.update(task, advance=1, loss=train_loss)
            last = step == steps - 1
            if (step + 1) % eval_interval == 0 or last:
                val_loss, val_acc = evaluate(classifier, val_ids, val_labels, pad_id)
                history.append({"step": step + 1, "tokens": tokens, "val_loss": val_loss, "val_accuracy": val_acc,
                                "elapsed_s": round(time.perf_counter() - t0, 2)})
            if (step + 1) % log_interval == 0 or last:
                elapsed = time.perf_counter() - t0
                history.append({"step": step + 1, "tokens": tokens, "lr": lr, "train_loss": train_loss,
                                "tokens_per_s": round(tokens / elapsed, 1), "elapsed_s": round(elapsed, 2)})
                _write_progress(out_dir, {"step": step + 1, "total_steps": steps, "tokens": tokens,
                                          "train_loss": train_loss, "val_loss": val_loss,
                                          "tokens_per_s": round(tokens / elapsed, 1),
                                          "eta_s": round(elapsed / (step + 1) * (steps - step - 1), 1),
                                          "state": "running"})
    extra = {"mode": "trained", "pooling": "last token", "fine_tuning": "lora" if is_lora(classifier.lm) else "full",
             "lora_rank": getattr(config, "lora_rank", 0), "steps": steps, "trainable_parameters": trainable,
             "parameters": total, "train_loss": train_loss,
             "val_loss": val_loss, "train_seconds": round(time.perf_counter() - t0, 1)}
    return classifier, history, extra


@torch.no_grad()
def predict(classifier: SequenceClassifier, rows: list[list[int]], pad_id: int, batch_size: int = 32) -> list[int]:
    """The argmax label id of each encoded row (eval mode, batches of `batch_size`)."""
    classifier.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        ids, lengths = pad_batch(rows[start:start + batch_size], pad_id)
        out += classifier(ids, lengths).argmax(-1).tolist()
    return out


@torch.no_grad()
def evaluate(classifier: SequenceClassifier, rows: list[list[int]], labels: list[int], pad_id: int,
             batch_size: int = 32) -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy) over all `rows`."""
    classifier.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(rows), batch_size):
        ids, lengths = pad_batch(rows[start:start + batch_size], pad_id)
        logits = classifier(ids, lengths).float()
        target = torch.tensor(labels[start:start + batch_size])
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(-1) == target).sum())
    classifier.train()
    return loss / len(rows), correct / len(rows)


# ---- the checkpoint ----------------------------------------------------------------------------------


def save_classifier(classifier: SequenceClassifier, model_config: ModelConfig, tokenizer: Tokenizer,
                    names: list[str], pad_id: int, path: str | Path, extras: Any = None, config: Any = None) -> Path:
    """Write the classifier as a Hugging Face checkpoint that `transformers.AutoModelForSequenceClassification`
    loads: config.json with `architectures` [`LlamaForSequenceClassification`] (Qwen2/Mistral/GPT2 likewise),
    `num_labels`, `id2label`, `label2id` and `pad_token_id`; model.safetensors with the language model's
    weights under transformers' names (`model.*`, GPT-2 `transformer.*`; no `lm_head`) and `score.weight`
    `[num_labels, hidden]`; the tokenizer files. LoRA adapters are merged first (`finalize_model`; with
    `lora_merge` False the adapter is also written to `adapter/`). Atomic, through `llmos.model.loader.save_model`.
    """
    adapter_tmp = Path(tempfile.mkdtemp(prefix=".llmos-adapter-"))
    try:
        lm = finalize_model(config, classifier.lm, adapter_dir=adapter_tmp / "adapter")
        classifier.lm = lm
        adapter = adapter_tmp / "adapter" if (adapter_tmp / "adapter").is_dir() else None
        return _save_classifier(classifier, lm, model_config, tokenizer, names, pad_id, path, extras, adapter)
    finally:
        shutil.rmtree(adapter_tmp, ignore_errors=True)


def _save_classifier(classifier, lm, model_config, tokenizer, names, pad_id, path, extras, adapter) -> Path:
    hf_config = model_config.to_hf()
    hf_config.update({"architectures": [HF_CLASSIFIERS[model_config.model_type]], "num_labels": len(names),
                      "id2label": {str(i): n for i, n in enumerate(names)},
                      "label2id": {n: i for i, n in enumerate(names)}, "pad_token_id": pad_id,
                      "problem_type": "single_label_classification"})
    return save_model(_ClassifierWeights(lm, classifier.score), model_config, path,
                      tokenizer=_ClassifierFiles(tokenizer, hf_config, extras, adapter))


class _ClassifierWeights(nn.Module):
    """What `save_model` writes as weights: the language model without `lm_head`, plus `score`."""

    def __init__(self, lm: nn.Module, score: nn.Linear) -> None:
        super().__init__()
        self.config = lm.config
        self.score = score
        self._lm = [lm]  # not a submodule: its state_dict is filtered below

    def state_dict(self, *args, **kwargs):
        state = {k: v for k, v in self._lm[0].state_dict().items() if not k.startswith("lm_head.")}
        state["score.weight"] = self.score.weight
        return state


class _ClassifierFiles:
    """`save_model`'s hook into the temporary checkpoint directory: tokenizer, classification config.json
    (replacing the causal-LM one), the report files and, with `lora_merge` False, the adapter."""

    def __init__(self, tokenizer, hf_config, extras, adapter: Path | None) -> None:
        self.tokenizer, self.hf_config, self.extras, self.adapter = tokenizer, hf_config, extras, adapter

    def save(self, path: Path) -> None:
        self.tokenizer.save(path)
        cfg = dict(self.hf_config)
        cfg["torch_dtype"] = json.loads((Path(path) / "config.json").read_text())["torch_dtype"]
        (Path(path) / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if self.extras is not None:
            self.extras.write_into(Path(path))
        if self.adapter is not None:
            shutil.copytree(self.adapter, Path(path) / "adapter")


class _ReportFiles:
    """metrics.json, metrics.jsonl, predictions.csv, confusion.png and config.yaml of one run."""

    def __init__(self, config, report, names, confusion, predictions, history) -> None:
        self.config, self.report, self.names, self.confusion = config, report, names, confusion
        self.predictions, self.history = predictions, history

    def write_into(self, d: Path) -> None:
        (d / "metrics.json").write_text(json.dumps(self.report, indent=2) + "\n")
        steps = self.report.get("steps", 0)
        train = [r for r in self.history if "train_loss" in r]
        (d / "progress.json").write_text(json.dumps(
            {"step": steps, "total_steps": steps, "tokens": train[-1]["tokens"] if train else 0,
             "train_loss": self.report.get("train_loss"), "val_loss": self.report.get("val_loss"),
             "tokens_per_s": train[-1]["tokens_per_s"] if train else None, "eta_s": 0.0, "state": "finished",
             "accuracy": self.report["accuracy"]}) + "\n")
        if self.history:
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))
        with open(d / "predictions.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["text", "label", "prediction"])
            writer.writerows(self.predictions)
        title = f"{self.report['mode']}: accuracy {self.report['accuracy']:.3f} on {self.report['val_examples']} rows"
        plot_confusion(self.confusion, self.names, title, d / "confusion.png")
        (d / "config.yaml").write_text(_config_text(self.config))

    def write_dir(self, out: Path) -> None:
        """A report-only directory (zero-shot), written to a temporary directory and swapped into place."""
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            self.write_into(tmp)
            os.chmod(tmp, 0o755)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ---- helpers -----------------------------------------------------------------------------------------


def _check_out_dir(out: str | Path) -> Path:
    """`check_checkpoint_target`, also accepting the report directory of an earlier zero-shot run."""
    try:
        return check_checkpoint_target(out)
    except ModelLoadError:
        path = Path(out).expanduser().absolute()
        cwd = Path.cwd().absolute()
        names = {p.name for p in path.iterdir()} if path.is_dir() else set()
        if (names and names <= set(REPORT_FILES) and names & {"metrics.json", "progress.json"}
                and path != cwd and path not in cwd.parents and path != Path.home().absolute()):
            return path
        raise


def _write_progress(out_dir: Path, row: dict) -> None:
    """`<out>/progress.json` (the run-directory contract, read by `llmos ps`), rewritten atomically; only into
    a directory that is new, a checkpoint or a classify report (`_check_out_dir` accepted it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".progress.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(row) + "\n")
    os.replace(tmp, out_dir / "progress.json")


class _report_dir_aside:
    """Around saving a checkpoint to `out`: a directory of classify report files only (an earlier zero-shot
    run, or this run's progress.json) is moved aside so `save_model` may write there, restored if the save
    fails, deleted once it succeeded. An existing checkpoint stays where it is (`save_model` swaps it)."""

    def __init__(self, out: Path) -> None:
        self.out, self.old = out, None

    def __enter__(self):
        if self.out.is_dir() and not (self.out / "config.json").exists() and any(self.out.iterdir()):
            self.old = self.out.with_name(f".{self.out.name}.report-{os.getpid()}")
            os.replace(self.out, self.old)
        elif (self.out / "config.json").exists():
            (self.out / "progress.json").unlink(missing_ok=True)
        return self

    def __exit__(self, kind, value, tb) -> None:
        if self.old is None:
            return
        if kind is None:
            shutil.rmtree(self.old, ignore_errors=True)
        elif not self.out.exists():
            os.replace(self.old, self.out)


def _pad_id(tokenizer: Tokenizer, model_config: ModelConfig) -> int:
    """The padding token: the tokenizer's pad token, else its first EOS, else the model's EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, *tokenizer.eos_token_ids, *model_config.eos_token_ids):
        if candidate is not None:
            return int(candidate)
    return 0


def _progress(enabled: bool, total: int):
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]classify"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), disable=not enabled)


def _as_list(data) -> list:
    return [data] if isinstance(data, (str, Path)) else list(data or [])


def _config_text(config: Any) -> str:
    """The resolved config as YAML (JSON where pyyaml is missing: JSON is valid YAML)."""
    if hasattr(config, "to_dict"):
        d = config.to_dict()
    elif is_dataclass(config):
        d = asdict(config)
    else:
        d = dict(vars(config))
    try:
        import yaml

        return yaml.safe_dump(json.loads(json.dumps(d, default=str)), sort_keys=False)
    except ImportError:
        return json.dumps(d, indent=2, default=str) + "\n"
