#!/usr/bin/env bash
# Rebuild llmos's bundled default model, src/llmos/assets/default-model/, in one command:
#
#   scripts/make_default_model.sh            # the shipped settings (15-25 minutes on 2 shared CPU cores)
#   STEPS=20 OUT=/tmp/smoke scripts/make_default_model.sh   # a quick smoke run elsewhere
#   CARD_ONLY=1 scripts/make_default_model.sh                # only step 4, for an already trained $OUT
#
# 1. installs Debian's bible-kjv (the King James Bible, public domain) if its `bible` program is missing;
# 2. extracts the text, one file per book (chapter headings, one verse per line, verse numbers dropped)
#    into data/kjv/ (git-ignored), and holds out five whole books (Ruth, Jonah, Titus, Philemon, Jude)
#    as heldout.txt, never trained on;
# 3. trains with `llmos train` (python -m llmos.cli.train_cmd) into $OUT;
# 4. copies heldout.txt beside the weights and writes the model card README.md with the measured
#    numbers (heldout perplexity by llmos.train.evaluate.perplexity).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
if [ -x /work/venv/bin/python ] && [ "$PYTHON" = python ]; then PYTHON=/work/venv/bin/python; fi
OUT="${OUT:-src/llmos/assets/default-model}"
DATA="${DATA:-data/kjv}"
STEPS="${STEPS:-650}"
THREADS="${THREADS:-1}"  # 1 thread: on a shared 2-core machine a second thread mostly waits (see the card)
HELDOUT_BOOKS="Ruth|Jonah|Titus|Philemon|Jude"

if [ "${CARD_ONLY:-0}" != 1 ]; then
# ---- 1. the text ------------------------------------------------------------------------------------
if ! command -v bible >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get install -y bible-kjv
fi

# ---- 2. corpus: one file per book, held-out books apart -------------------------------------------
rm -rf "$DATA"
mkdir -p "$DATA/train" "$DATA/heldout"
# -l9999: pretty-printed (book and chapter headings, indented verses) without line wrapping.
bible -l9999 gen1:1-rev22:21 | HELDOUT_BOOKS="$HELDOUT_BOOKS" DATA="$DATA" "$PYTHON" -c '
import os, re, sys
books, order, current = {}, [], None
for line in sys.stdin.read().split("\n"):
    heading = re.fullmatch(r"(\S.*) (\d+)", line)
    if heading:                      # "Genesis 1", "1 Samuel 3", "Song of Solomon 2"
        current = heading.group(1)
        if current not in books:
            books[current] = []
            order.append(current)
        books[current].append(("\n" if books[current] else "") + line + "\n")
    elif line.startswith("  "):      # "  12 And the earth brought forth grass, ..."
        books[current].append(re.sub(r"^\s+\d+ ", "", line))
assert len(order) == 66 and sum(len(v) for v in books.values()) == 31102 + 1189, "unexpected bible output"
held = os.environ["HELDOUT_BOOKS"].split("|")
data = os.environ["DATA"]
for i, name in enumerate(order, 1):
    slug = name.lower().replace(" ", "-")
    where = "heldout" if name in held else "train"
    with open(f"{data}/{where}/{i:02d}-{slug}.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(books[name]) + "\n")
'
# heldout.txt: the held-out books in Bible order, separated by a blank line.
"$PYTHON" - "$DATA/heldout" > "$DATA/heldout.txt" <<'EOF'
import sys
from pathlib import Path
print("\n".join(p.read_text(encoding="utf-8") for p in sorted(Path(sys.argv[1]).glob("*.txt"))), end="")
EOF
echo "corpus: $(cat "$DATA"/train/*.txt | wc -c) bytes in $(ls "$DATA/train" | wc -l) books;" \
     "held out: $(wc -c < "$DATA/heldout.txt") bytes"

# ---- 3. train -----------------------------------------------------------------------------------------
nice -n 10 "$PYTHON" -m llmos.cli.train_cmd \
    --data "$DATA/train" --out "$OUT" \
    --vocab-size 8192 --hidden-size 256 --layers 4 --heads 8 --kv-heads 4 --intermediate-size 768 \
    --seq-len 256 --batch-size 8 --max-steps "$STEPS" \
    --lr 2e-3 --min-lr 2e-4 --warmup-steps 50 --weight-decay 0.1 --grad-clip 1.0 \
    --val-fraction 0.05 --eval-interval 50 --eval-steps 10 --log-interval 10 \
    --seed 1337 --save-dtype float32 --threads "$THREADS"
# The run directory's resumable state (checkpoints/: weights + AdamW moments) and token shards (data/) are not
# part of the shipped model; config.yaml, metrics.jsonl, loss.png and summary.json stay beside the weights.
rm -rf "$OUT/checkpoints" "$OUT/data" "$OUT/progress.json"
cp "$DATA/heldout.txt" "$OUT/heldout.txt"
fi

# ---- 4. model card ----------------------------------------------------------------------------------
chmod -R u=rwX,go=rX "$OUT"  # the atomic save leaves a private (0700) temporary directory's modes
CORPUS_SHA=$(cat "$DATA"/train/*.txt | sha256sum | cut -c1-16)
OUT="$OUT" CORPUS_SHA="$CORPUS_SHA" HELDOUT_BOOKS="$HELDOUT_BOOKS" "$PYTHON" - <<'EOF'
import json, os, platform
from pathlib import Path

import torch
import yaml

from llmos.model.loader import load_model
from llmos.model.tokenizer import Tokenizer
from llmos.train.evaluate import encode_for_eval, perplexity

out = Path(os.environ["OUT"])
cfg = json.loads((out / "config.json").read_text())
tc = yaml.safe_load((out / "config.yaml").read_text())
summary = json.loads((out / "summary.json").read_text())
model, config = load_model(out)
tokenizer = Tokenizer.from_dir(out)
heldout = (out / "heldout.txt").read_text(encoding="utf-8")
ppl = perplexity(model, tokenizer, heldout, config.max_position_embeddings)
params = config.num_parameters()
weights_mb = (out / "model.safetensors").stat().st_size / 1e6


def sample(prompt: str, new_tokens: int = 48) -> str:
    """Top-k 40, temperature 0.8, seed 0; the dense forward pass, one token at a time."""
    ids, gen = tokenizer.encode(prompt), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids[-config.max_position_embeddings:]]))[0, -1] / 0.8
            logits[logits < torch.topk(logits, 40).values[-1]] = -float("inf")
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).item()
            if token in tokenizer.eos_token_ids:
                break
            ids.append(token)
    return tokenizer.decode(ids)


indent = lambda text: "\n".join("    " + line if line.strip() else "" for line in text.split("\n"))
samples = "\n\n".join(indent(sample(p)) for p in ("And God said", "The LORD is my shepherd"))
books = os.environ["HELDOUT_BOOKS"].replace("|", ", ")
card = f"""# llmos default model: kjv-5m

A tiny Llama-architecture language model trained from scratch by `llmos train` on the King James
Bible, bundled with llmos so that `llmos run` and the tests work without downloading anything.
It writes King-James-flavoured English and knows nothing else; it is a demonstration model, not an
assistant.

parameters: {params}
heldout_perplexity: {ppl:.2f}
validation_perplexity: {summary["val_perplexity"]:.2f}
tokens_seen: {summary["tokens"]}
train_seconds: {summary["train_seconds"]:.0f}

## Architecture

Llama (transformers `LlamaForCausalLM`): {cfg["num_hidden_layers"]} layers, hidden size {cfg["hidden_size"]},
{cfg["num_attention_heads"]} attention heads of {cfg["head_dim"]} with {cfg["num_key_value_heads"]} key/value heads
(grouped-query attention), SwiGLU MLP of {cfg["intermediate_size"]}, RMSNorm, RoPE (theta {cfg["rope_theta"]:g}),
tied input/output embeddings, no biases, context {cfg["max_position_embeddings"]} tokens.
{params:,} parameters ({config.vocab_size * config.hidden_size:,} of them in the embedding), stored as
{cfg["torch_dtype"]} in model.safetensors ({weights_mb:.1f} MB).

Tokenizer: byte-level BPE (GPT-2 style, trained with Hugging Face `tokenizers` by `llmos.train.bpe`),
{config.vocab_size} tokens. `<|endoftext|>` (id {config.bos_token_id}) is BOS, EOS and the document separator;
encoding with special tokens prepends it.

## Data

The King James Version of the Bible (1611; public domain), as shipped by Debian's `bible-kjv`
package (version 4.38, text by the Bible Retrieval System, Chip Chapin, "provided for unrestricted
use"). Extracted with `bible -l9999 gen1:1-rev22:21`, one file (one training document) per book:
chapter headings (`Genesis 1`) and one verse per line, verse numbers dropped.
Five whole books are held out and never trained on: {books}; they are `heldout.txt`
({len(heldout.encode()):,} bytes, {len(encode_for_eval(tokenizer, heldout)):,} tokens with the leading BOS).
The other 61 books ({summary["data_tokens"]:,} tokens; sha256 of the concatenated files
{os.environ["CORPUS_SHA"]}...) are split into training ({summary["train_tokens"]:,} tokens) and
validation ({summary["val_tokens"]:,} tokens: {tc["val_fraction"]:.0%} of the stream, in evenly spaced chunks of
{8 * (tc["seq_len"] + 1)} tokens).

## Training

AdamW (betas {tc["beta1"]}, {tc["beta2"]}; weight decay {tc["weight_decay"]} on matrices only), peak learning
rate {tc["lr"]:g} with {tc["warmup_steps"]} warmup steps and cosine decay to {tc["min_lr"]:g}, gradient clipping at
{tc["grad_clip"]}, {summary["steps"]} steps of {tc["batch_size"]} x {tc["seq_len"]} tokens
= {summary["tokens"]:,} tokens (about {summary["tokens"] / summary["train_tokens"]:.1f} epochs), fp32, seed {tc["seed"]}.
Trained in {summary["train_seconds"] / 60:.1f} minutes (plus about half a minute for the tokenizer and the data)
on a shared 2-core AMD EPYC virtual machine ({platform.machine()}), {tc["num_threads"]} torch thread(s), `nice -n 10`,
while other jobs ran: {summary["tokens"] / summary["train_seconds"]:,.0f} tokens/s on average (on that machine a
second torch thread mostly waited for the other jobs, so one thread was faster). Final training loss {summary["train_loss"]:.3f}, validation loss {summary["val_loss"]:.3f}
(perplexity {summary["val_perplexity"]:.2f}). The curve is `loss.png`; every logged step is in `metrics.jsonl`;
all settings are in `config.yaml`.

## Evaluation

`heldout_perplexity` is `llmos.train.evaluate.perplexity(model, tokenizer, heldout_text, seq_len={config.max_position_embeddings})`:
the text is encoded without special tokens and prefixed with BOS, cut into non-overlapping windows of
{config.max_position_embeddings} predicted tokens (each window starts a fresh context), and the perplexity is
exp(total negative log-likelihood / predicted tokens), in nats, over every token after the first.
Reproduce it with `python -m llmos.train.evaluate src/llmos/assets/default-model src/llmos/assets/default-model/heldout.txt`.
`validation_perplexity` is exp of the mean loss over {tc["eval_steps"]} random validation batches (fixed seed).

## Samples

Top-k 40, temperature 0.8, seed 0, 48 new tokens (`scripts/make_default_model.sh` step 4):

{samples}

## Reproduce

`scripts/make_default_model.sh` (Debian or Ubuntu; installs `bible-kjv`). Numbers move slightly with
the machine's floating-point reductions; timings move with its load.

## License

Weights and tokenizer: Apache-2.0, like llmos. Training text: public domain (King James Version).
"""
(out / "README.md").write_text(card, encoding="utf-8")
print(f"heldout perplexity {ppl:.2f}, validation perplexity {summary['val_perplexity']:.2f}, "
      f"{params:,} parameters, {weights_mb:.1f} MB, {summary['train_seconds']:.0f} s training")
EOF
