#!/usr/bin/env bash
# Build llmos's shipped classification dataset, src/llmos/assets/datasets/kjv-genre.csv, in one command:
#
#   scripts/make_classify_data.sh                       # the shipped file (seconds)
#   PER_LABEL=100 OUT=/tmp/small.csv scripts/make_classify_data.sh
#
# 1. installs Debian's bible-kjv (the King James Bible, public domain) if its `bible` program is missing;
# 2. reads every verse (`bible -l9999 gen1:1-rev22:21`, as scripts/make_default_model.sh does) and labels it
#    by the section of the Bible its book belongs to:
#      law       Genesis-Deuteronomy (the Pentateuch)
#      history   Joshua-Esther, and Acts (the history of the early church)
#      poetry    Job, Psalms, Proverbs, Ecclesiastes, Song of Solomon (poetry and wisdom)
#      prophets  Isaiah-Malachi, and Revelation (apocalyptic prophecy)
#      gospels   Matthew, Mark, Luke, John
#      epistles  Romans-Jude
# 3. draws PER_LABEL verses per label uniformly at random (seed SEED) without replacement, shuffles the
#    rows, and writes CSV columns text,label,book (RFC 4180 quoting by Python's csv module, UTF-8, \n).
#
# The default model (src/llmos/assets/default-model) was pretrained on every book except Ruth, Jonah, Titus,
# Philemon and Jude, so it has seen the text (not the labels) of all other rows; the `book` column tells
# which rows come from the held-out books.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
if [ -x /work/venv/bin/python ] && [ "$PYTHON" = python ]; then PYTHON=/work/venv/bin/python; fi
OUT="${OUT:-src/llmos/assets/datasets/kjv-genre.csv}"
PER_LABEL="${PER_LABEL:-500}"
SEED="${SEED:-1611}"

if ! command -v bible >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get install -y bible-kjv
fi

mkdir -p "$(dirname "$OUT")"
bible -l9999 gen1:1-rev22:21 | OUT="$OUT" PER_LABEL="$PER_LABEL" SEED="$SEED" "$PYTHON" -c '
import csv, io, os, random, re, sys
verses, order, current = {}, [], None
for line in sys.stdin.read().split("\n"):
    heading = re.fullmatch(r"(\S.*) (\d+)", line)
    if heading:                      # "Genesis 1", "1 Samuel 3", "Song of Solomon 2"
        current = heading.group(1)
        if current not in verses:
            verses[current] = []
            order.append(current)
    elif line.startswith("  "):      # "  12 And the earth brought forth grass, ..."
        verses[current].append(re.sub(r"^\s+\d+ ", "", line).strip())
assert len(order) == 66 and sum(len(v) for v in verses.values()) == 31102, "unexpected bible output"

def label(i):                        # i: 1-based position of the book in the Protestant canon
    if i <= 5: return "law"
    if i <= 17 or i == 44: return "history"
    if i <= 22: return "poetry"
    if i <= 39 or i == 66: return "prophets"
    if i <= 43: return "gospels"
    return "epistles"

by_label = {}
for i, book in enumerate(order, 1):
    by_label.setdefault(label(i), []).extend((text, book) for text in verses[book] if text)
rng = random.Random(int(os.environ["SEED"]))
rows = []
for name in ("law", "history", "poetry", "prophets", "gospels", "epistles"):
    rows += [(text, name, book) for text, book in rng.sample(by_label[name], int(os.environ["PER_LABEL"]))]
rng.shuffle(rows)
buf = io.StringIO()
writer = csv.writer(buf, lineterminator="\n")
writer.writerow(["text", "label", "book"])
writer.writerows(rows)
out = os.environ["OUT"]
tmp = out + ".tmp"
with open(tmp, "w", encoding="utf-8", newline="") as f:
    f.write(buf.getvalue())
os.replace(tmp, out)
held = sum(book in ("Ruth", "Jonah", "Titus", "Philemon", "Jude") for _, _, book in rows)
print(f"{out}: {len(rows)} rows, {len(by_label)} labels, {held} rows from the held-out books, "
      f"{os.path.getsize(out):,} bytes")
'
