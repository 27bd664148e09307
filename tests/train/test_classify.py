"""llmos.train.classify on tiny models and tiny CSVs: training beats chance, zero-shot scoring against a brute-force
transformers oracle, the confusion matrix against a recount, the checkpoint against transformers' classifier."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

from llmos.errors import DataError, InvalidRequestError, ModelLoadError, TrainingDivergedError
from llmos.train.classify import (
    DEFAULT_DATASET, SequenceClassifier, ZERO_SHOT_TEMPLATE, confusion_matrix, encode_texts, pad_batch,
    read_labelled_csv, run_classify, save_classifier, stratified_split, zero_shot_scores,
)
from llmos.train.config import TrainConfig
from llmos.train.finetune import load_base, prepare_model


def CConfig(**overrides) -> TrainConfig:
    """A TrainConfig with small classify settings."""
    settings = dict(task="classify", seq_len=32, batch_size=8, max_steps=40, lr=1e-2, min_lr=1e-3, warmup_steps=4,
                    weight_decay=0.0, val_fraction=0.25, eval_interval=20, log_interval=5, seed=0, num_threads=1,
                    progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


# Three labels, each with its own words; the last word alone tells the label (an easy, separable task).
WORDS = {"earth": ["heaven", "earth", "light", "darkness", "deep", "waters"],
         "animals": ["quick", "brown", "fox", "lazy", "dog", "jumps"],
         "code": ["def", "main", "print", "hello", "world", "return"]}


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def easy_rows(n_per_label=40, seed=0):
    rng = random.Random(seed)
    rows = []
    for label, words in WORDS.items():
        for _ in range(n_per_label):
            rows.append((" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))), label))
    rng.shuffle(rows)
    return rows


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def easy_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "easy.csv", easy_rows())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, bases, easy_csv):
    out = tmp_path_factory.mktemp("run") / "clf"
    config = CConfig(data=[str(easy_csv)], out_dir=str(out), init_from=str(bases["llama"]))
    return config, run_classify(config)


def test_training_beats_chance_on_a_separable_task(trained_run):
    config, report = trained_run
    assert report["mode"] == "trained" and report["fine_tuning"] == "full"
    assert report["labels"] == ["animals", "code", "earth"] and report["val_examples"] == 30
    assert report["accuracy"] >= 0.8 > report["chance"] + 0.4
    rows = [json.loads(line) for line in open(f"{config.out_dir}/metrics.jsonl")]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [20, 40]
    assert [r for r in rows if "val_accuracy" in r][-1]["val_accuracy"] == report["accuracy"]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(5, 41, 5))
    progress = json.loads(open(f"{config.out_dir}/progress.json").read())
    assert progress["state"] == "finished" and progress["step"] == progress["total_steps"] == 40
    assert progress["tokens"] == rows[-1]["tokens"] > 40 * 8


def test_confusion_matrix_matches_a_recount_of_the_predictions(trained_run, easy_csv):
    config, report = trained_run
    saved = json.loads(open(f"{config.out_dir}/metrics.json").read())
    assert saved["confusion"] == report["confusion"]
    confusion = np.array(report["confusion"])
    assert confusion.sum() == report["val_examples"]
    with open(f"{config.out_dir}/predictions.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    names = report["labels"]
    recount = [[0] * len(names) for _ in names]
    for row in predictions:
        recount[names.index(row["label"])][names.index(row["prediction"])] += 1
    assert recount == report["confusion"]
    assert report["accuracy"] == sum(r["label"] == r["prediction"] for r in predictions) / len(predictions)
    for i, name in enumerate(names):  # stratified: 40 rows per label, a quarter held out
        assert report["per_label"][name]["support"] == confusion[i].sum() == 10
    texts, _ = read_labelled_csv(easy_csv)
    assert {r["text"] for r in predictions} <= set(texts)


def test_run_writes_a_checkpoint_transformers_loads(trained_run):
    config, report = trained_run
    hf_config = json.loads(open(f"{config.out_dir}/config.json").read())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"] and hf_config["num_labels"] == 3
    assert hf_config["id2label"] == {"0": "animals", "1": "code", "2": "earth"}
    model = T.AutoModelForSequenceClassification.from_pretrained(config.out_dir).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(config.out_dir)
    assert model.config.label2id == {"animals": 0, "code": 1, "earth": 2}
    with open(f"{config.out_dir}/predictions.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    with torch.no_grad():
        batch = tokenizer([r["text"] for r in predictions], padding=True, return_tensors="pt")
        theirs = model(input_ids=batch["input_ids"]).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in theirs] == [r["prediction"] for r in predictions]


@pytest.mark.parametrize("family,lora_rank", [("llama", 0), ("llama", 4), ("qwen2", 0), ("gpt2", 4)])
def test_saved_classifier_has_the_same_logits_in_transformers(bases, tmp_path, family, lora_rank):
    config = CConfig(init_from=str(bases[family]), lora_rank=lora_rank)
    model, mc, tokenizer = load_base(config)
    classifier = SequenceClassifier(prepare_model(config, model), 3)
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    if lora_rank:
        assert all(".lora_" in n or n == "score.weight" for n in trainable)
    opt = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=1e-2)
    rows = encode_texts(tokenizer, [t for t, _ in easy_rows(4)], 32, 1)
    labels = torch.tensor([list(WORDS).index(lab) for _, lab in easy_rows(4)])
    for _ in range(3):  # move the weights away from their initial values
        ids, lengths = pad_batch(rows, 1)
        F.cross_entropy(classifier(ids, lengths), labels).backward()
        opt.step()
        opt.zero_grad()
    classifier.eval()
    ids, lengths = pad_batch(rows, 1)
    with torch.no_grad():
        ours = classifier(ids, lengths)
    save_classifier(classifier, mc, tokenizer, ["a", "b", "c"], 1, tmp_path / "clf", config=config)
    theirs = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf", attn_implementation="eager")
    assert type(theirs).__name__ == {"llama": "LlamaForSequenceClassification",
                                     "qwen2": "Qwen2ForSequenceClassification",
                                     "gpt2": "GPT2ForSequenceClassification"}[family]
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(input_ids=ids).logits, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(classifier(ids, lengths), ours, atol=1e-5, rtol=0)  # merged: same logits


def test_lora_run_trains_only_adapters_and_the_head(bases, easy_csv, tmp_path):
    config = CConfig(data=[str(easy_csv)], out_dir=str(tmp_path / "clf"), init_from=str(bases["llama"]), lora_rank=8,
                     lora_merge=False, max_steps=40, lr=2e-2)
    report = run_classify(config)
    assert report["fine_tuning"] == "lora" and report["trainable_parameters"] < report["parameters"] / 5
    assert report["accuracy"] > report["chance"] + 0.2
    assert sorted(p.name for p in (tmp_path / "clf" / "adapter").iterdir()) == ["adapter_config.json",
                                                                                "adapter_model.safetensors"]
    adapter = json.loads((tmp_path / "clf" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["base_model_name_or_path"] == str(bases["llama"].absolute())
    assert "init_from: " + str(bases["llama"]) in (tmp_path / "clf" / "config.yaml").read_text()
    T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")


def test_zero_shot_scores_equal_a_brute_force_transformers_oracle(bases):
    model, _, tokenizer = load_base(CConfig(init_from=str(bases["llama"])))
    hf = T.AutoModelForCausalLM.from_pretrained(bases["llama"]).eval()
    texts, labels = ["The quick brown fox", "In the beginning God created"], ["earth", "animals", "code"]
    scores, calibrated = zero_shot_scores(model, tokenizer, texts, labels, 64)
    np.testing.assert_allclose(calibrated, scores - scores.mean(0), atol=1e-9)

    def loglik(prompt: str, label: str) -> float:
        """log P(label | prompt) from the joint string's tokens, one label token at a time."""
        context = tokenizer.encode(prompt)
        whole = tokenizer.encode(prompt + " " + label)
        assert whole[:len(context)] == context
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0], -1)
        return sum(logp[j - 1, whole[j]].item() for j in range(len(context), len(whole)))

    assert ZERO_SHOT_TEMPLATE == "{text}\nLabel: {label}"
    for i, text in enumerate(texts):
        for j, label in enumerate(labels):
            expected = loglik(f"{text}\nLabel:", label)
            assert scores[i, j] == pytest.approx(expected, abs=1e-4)


def test_zero_shot_on_a_rigged_model(bases, tmp_path):
    """A tiny LM taught "{text}\\nLabel: {label}" for two patterns: zero-shot must then get them all right."""
    config = CConfig(init_from=str(bases["llama"]))
    model, _, tokenizer = load_base(config)
    pairs = [("In the beginning God created", "earth"), ("The quick brown fox jumps", "animals")]
    docs = [tokenizer.encode(ZERO_SHOT_TEMPLATE.format(text=t, label=lab)) for t, lab in pairs]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        for doc in docs:
            ids = torch.tensor([doc])
            F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).backward()
        opt.step()
        opt.zero_grad()
    from llmos.model.loader import save_model

    save_model(model.eval(), model.config, tmp_path / "rigged", tokenizer=tokenizer)
    rows = [(t, lab) for t, lab in pairs] * 6
    data = write_csv(tmp_path / "rigged.csv", rows)
    report = run_classify(CConfig(data=[str(data)], out_dir=str(tmp_path / "zs"), init_from=str(tmp_path / "rigged"),
                                  zero_shot=True, val_fraction=0.5, seq_len=64))
    assert report["mode"] == "zero-shot" and report["val_examples"] == 6
    assert report["accuracy"] == 1.0 and report["confusion"] == [[3, 0], [0, 3]]
    assert sorted(p.name for p in (tmp_path / "zs").iterdir()) == ["config.yaml", "confusion.png", "metrics.json",
                                                                   "predictions.csv", "progress.json"]
    again = run_classify(CConfig(data=[str(data)], out_dir=str(tmp_path / "zs"), init_from=str(tmp_path / "rigged"),
                                 zero_shot=True, val_fraction=0.5, seq_len=64))  # an earlier report is replaced whole
    assert again["confusion"] == report["confusion"]
    trained = run_classify(CConfig(data=[str(data)], out_dir=str(tmp_path / "zs"), init_from=str(tmp_path / "rigged"),
                                   val_fraction=0.5, seq_len=64, max_steps=2))  # and so by a trained run
    assert trained["mode"] == "trained" and (tmp_path / "zs" / "config.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stratified_split():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 1
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + val) == list(range(81)) and not set(train) & set(val)
    assert [sum(labels[i] == x for i in val) for x in "abc"] == [10, 6, 0]
    assert stratified_split(labels, 0.2, seed=3) == (train, val)
    assert stratified_split(labels, 0.2, seed=4) != (train, val)
    assert confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2], 3).tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_the_shipped_dataset_reads():
    texts, labels = read_labelled_csv(DEFAULT_DATASET)
    assert len(texts) == 3000 and DEFAULT_DATASET.stat().st_size < 600_000
    assert sorted(set(labels)) == ["epistles", "gospels", "history", "law", "poetry", "prophets"]
    assert all(labels.count(x) == 500 for x in set(labels))


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_csvs_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_labelled_csv(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv is empty"):
        read_labelled_csv(tmp_path / "empty.csv")
    write_csv(tmp_path / "header.csv", [])
    with pytest.raises(DataError, match="header but no rows"):
        read_labelled_csv(tmp_path / "header.csv")
    write_csv(tmp_path / "cols.csv", [("hi", "x")], header=("sentence", "category"))
    with pytest.raises(DataError, match="no column 'text'; its columns are 'sentence', 'category'.*--text-column"):
        read_labelled_csv(tmp_path / "cols.csv")
    with pytest.raises(DataError, match="no column 'label'.*--label-column"):
        read_labelled_csv(tmp_path / "cols.csv", text_column="sentence")
    with open(tmp_path / "named.csv", "w", encoding="utf-8") as f:
        f.write('id,sentence,category\n1,"hi, there",x\n2,"a ""quoted""\nline",y\n')
    assert read_labelled_csv(tmp_path / "named.csv", "sentence", "category") == (
        ["hi, there", 'a "quoted"\nline'], ["x", "y"])
    write_csv(tmp_path / "one.csv", [("a b", "x"), ("c d", "x")])
    with pytest.raises(DataError, match="at least 2 labels; the data has only \\['x'\\]"):
        read_labelled_csv(tmp_path / "one.csv")
    write_csv(tmp_path / "blank.csv", [("a b", "x"), ("", "y")])
    with pytest.raises(DataError, match="blank.csv line 3: the text is empty"):
        read_labelled_csv(tmp_path / "blank.csv")
    (tmp_path / "blob.csv").write_bytes(b"text,label\n\x00\x01\x02,x\n")
    with pytest.raises(DataError, match="looks binary"):
        read_labelled_csv(tmp_path / "blob.csv")
    (tmp_path / "t.jsonl").write_text('{"text": "hi", "label": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="t.jsonl is not a .csv file"):
        read_labelled_csv(tmp_path / "t.jsonl")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_labelled_csv(tmp_path / "latin1.csv")
    with pytest.raises(InvalidRequestError, match="--val-fraction"):
        stratified_split(["a", "b"], 0.0, 0)
    with pytest.raises(DataError, match="single example"):
        stratified_split(["a", "b"], 0.2, 0)


def test_a_diverged_run_leaves_nothing(tmp_path, bases, easy_csv):
    with pytest.raises(TrainingDivergedError, match="diverged"):
        run_classify(CConfig(data=[str(easy_csv)], out_dir=str(tmp_path / "clf"), init_from=str(bases["llama"]),
                             lr=1e30, min_lr=1e30, grad_clip=0.0, max_steps=10, log_interval=1))
    assert list(tmp_path.iterdir()) == []


def test_bad_runs_fail_before_writing(tmp_path, bases, easy_csv):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="non-empty directory"):
        run_classify(CConfig(data=[str(easy_csv)], out_dir=str(tmp_path / "notes"), init_from=str(bases["llama"])))
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["keep.txt"]
    write_csv(tmp_path / "cols.csv", [("hi", "x")], header=("sentence", "category"))
    with pytest.raises(DataError, match="no column 'text'"):
        run_classify(CConfig(data=[str(tmp_path / "cols.csv")], out_dir=str(tmp_path / "a")))
    with pytest.raises(ModelLoadError, match="--arch gpt2 does not match"):
        run_classify(CConfig(data=[str(easy_csv)], out_dir=str(tmp_path / "a"), init_from=str(bases["llama"]),
                             arch="gpt2"))
    with pytest.raises(InvalidRequestError, match="--seq-len 300 is above the context"):
        run_classify(CConfig(data=[str(easy_csv)], out_dir=str(tmp_path / "a"), init_from=str(bases["llama"]),
                             seq_len=300))
    assert not (tmp_path / "a").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cols.csv", "notes"]  # no temporary directories
