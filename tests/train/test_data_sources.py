"""llmos.train.sources: every input format, the stated normalization/cleaning/dedup, and every bad input."""

from __future__ import annotations

import json

import pytest

from llmos.errors import DataError
from llmos.train.sources import SourceStats, iter_documents, process_text


def docs_of(paths, **options):
    return list(iter_documents(paths, **options))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ---- formats ------------------------------------------------------------------------------------


def test_folder_of_text_files_is_recursive_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "b.md").write_text("# B\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("sub a")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / ".y.txt").write_text("hidden file")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    stats = SourceStats()
    docs = docs_of([tmp_path], stats=stats)
    assert [d.text for d in docs] == ["# B\n", "sub a"]
    assert [d.source for d in docs] == [str(tmp_path / "b.md"), str(tmp_path / "sub" / "a.txt")]
    assert stats.documents == 2 and len(stats.files) == 2 and stats.bytes_read == 4 + 5


def test_a_file_named_explicitly_is_read_whatever_its_suffix(tmp_path):
    (tmp_path / "notes.text").write_text("\ufeffplain words")
    assert [d.text for d in docs_of(tmp_path / "notes.text")] == ["plain words"]  # one path, BOM dropped


def test_jsonl_text_messages_and_labels(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "name": "bot"}]
    write_jsonl(tmp_path / "d.jsonl", [{"text": "first", "label": "pos"}, {"messages": chat, "text": "ignored"},
                                        {"text": "third", "label": 3}])
    with open(tmp_path / "d.jsonl", "a") as f:
        f.write("\n   \n")  # blank lines are skipped
    docs = docs_of([tmp_path / "d.jsonl"])
    assert [d.text for d in docs] == ["first", None, "third"]
    assert docs[1].is_chat and list(docs[1].messages) == [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello"}]
    assert [d.label for d in docs] == ["pos", None, "3"]
    assert [d.source for d in docs] == [f"{tmp_path / 'd.jsonl'}:{i}" for i in (1, 2, 3)]


def test_jsonl_custom_field_names(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"body": "x y", "conv": [{"role": "user", "content": "q"}]}, {"body": "z"}])
    docs = docs_of([tmp_path / "d.jsonl"], text_field="body", messages_field="conv")
    assert docs[0].messages == ({"role": "user", "content": "q"},) and docs[1].text == "z"


def test_csv_quoted_newlines_bom_label_and_row_lines(tmp_path):
    (tmp_path / "d.csv").write_bytes(
        '\ufeffid,text,label\n1,"a, quoted\nnewline ""here""",pos\n\n2,plain,neg\n'.encode("utf-8"))
    docs = docs_of([tmp_path / "d.csv"])
    assert [d.text for d in docs] == ['a, quoted\nnewline "here"', "plain"]
    assert [d.label for d in docs] == ["pos", "neg"]
    assert [d.source.rsplit(":", 1)[1] for d in docs] == ["2", "5"]  # the first line of each row
    (tmp_path / "e.csv").write_text("review\nfine\n")
    assert [(d.text, d.label) for d in docs_of([tmp_path / "e.csv"], text_column="review")] == [("fine", None)]


def test_mixed_folder(tmp_path):
    (tmp_path / "a.txt").write_text("text file")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "json line"}])
    (tmp_path / "c.csv").write_text("text\ncsv row\n")
    assert [d.text for d in docs_of([tmp_path])] == ["text file", "json line", "csv row"]


# ---- normalization, cleaning, dedup -------------------------------------------------------------


def test_normalization_is_optional_and_stated():
    decomposed = "cafe\u0301 \ufb01ne \u00b2 \uff21"
    assert process_text(decomposed) == decomposed
    assert process_text(decomposed, "nfc") == "caf\u00e9 \ufb01ne \u00b2 \uff21"  # composes, keeps ligature
    assert process_text(decomposed, "nfkc") == "caf\u00e9 fine 2 A"


def test_cleaning_does_exactly_the_four_stated_things():
    raw = "\ufeffa\r\nb\rc\x00\x07d\te\n  \t\n\n\n\nf  \n\x85g"
    # CRLF/CR -> LF; control chars (not tab/newline) and BOM gone; whitespace-only lines emptied;
    # blank runs collapse to one blank line; trailing spaces on text lines stay.
    assert process_text(raw, clean=True) == "a\nb\ncd\te\n\nf  \ng"
    assert process_text(raw) == raw


def test_dedup_uses_processed_text_and_counts(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "caf\u00e9"}, {"text": "cafe\u0301"}, {"text": "other"},
                                        {"text": "other"}, {"text": "  \n"},
                                        {"messages": [{"role": "user", "content": "other"}]}])
    stats = SourceStats()
    docs = docs_of([tmp_path / "d.jsonl"], normalize="nfc", stats=stats)
    assert [d.text for d in docs] == ["caf\u00e9", "other", None]  # a chat doc never equals a text doc
    assert (stats.documents, stats.duplicates_removed, stats.empty_skipped) == (3, 2, 1)
    assert len(docs_of([tmp_path / "d.jsonl"])) == 4  # without nfc the two cafés differ
    assert len(docs_of([tmp_path / "d.jsonl"], dedup=False)) == 5  # the empty one is still skipped


def test_clean_applies_to_messages(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a\r\n\r\n\r\nb\x01"}]}])
    assert docs_of([tmp_path / "d.jsonl"], clean=True)[0].messages[0]["content"] == "a\n\nb"


# ---- bad input ------------------------------------------------------------------------------------


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="nope does not exist"):
        docs_of([tmp_path / "nope"])
    with pytest.raises(DataError, match="no training data given"):
        docs_of([])
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match="contains no .txt, .md, .jsonl or .csv files"):
        docs_of([tmp_path / "dir"])


@pytest.mark.parametrize("name,content", [("e.txt", b""), ("e.md", b"  \n\n"), ("e.jsonl", b"\n\n"),
                                          ("e.csv", b""), ("e.jsonl", b"")])
def test_empty_files(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"{name} is empty"):
        docs_of([tmp_path / name])


def test_csv_with_header_only(tmp_path):
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="h.csv has a header but no rows"):
        docs_of([tmp_path / "h.csv"])


@pytest.mark.parametrize("name", ["blob.txt", "blob.jsonl", "blob.csv"])
def test_binary_files(tmp_path, name):
    (tmp_path / name).write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=f"{name} looks binary"):
        docs_of([tmp_path / name])


def test_non_utf8_names_file_and_line(tmp_path):
    (tmp_path / "l.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"l.txt is not UTF-8 text \(byte 3.*iconv"):
        docs_of([tmp_path / "l.txt"])
    (tmp_path / "l.jsonl").write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"l.jsonl line 2 is not UTF-8"):
        docs_of([tmp_path / "l.jsonl"])
    (tmp_path / "l.csv").write_bytes(b"text\nok\n" + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"l.csv line 3 is not UTF-8"):
        docs_of([tmp_path / "l.csv"])


def test_jsonl_line_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(DataError, match=r"d.jsonl:2 is not valid JSON"):
        docs_of([p])
    p.write_text('{"text": "ok"}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d.jsonl:3 holds a JSON list, not an object"):
        docs_of([p])
    p.write_text('{"body": "x", "id": 1}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1 has neither a 'text' nor a 'messages' key \(keys: 'body', 'id'\)"
                                        r".*--text-field"):
        docs_of([p])
    p.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: 'text' must be a string, got int"):
        docs_of([p])
    p.write_text('{"text": "bad \\ud800 surrogate"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: 'text' holds a lone surrogate"):
        docs_of([p])


@pytest.mark.parametrize("messages,match", [
    ([], "must be a non-empty list"),
    ("hi", "must be a non-empty list"),
    ([{"role": "user"}], "message 0 must be an object with string 'role' and 'content'"),
    ([{"role": "user", "content": "a"}, "text"], "message 1 must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1 has role 'bot'; roles are"),
    ([{"role": "user", "content": ["parts"]}], "message 0 must be an object"),
])
def test_bad_messages(tmp_path, messages, match):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"messages": messages}])
    with pytest.raises(DataError, match=r"c.jsonl:2: .*" + match):
        docs_of([tmp_path / "c.jsonl"])


def test_csv_without_the_column_lists_its_columns(tmp_path):
    (tmp_path / "d.csv").write_text("review,stars\ngood,5\n")
    with pytest.raises(DataError, match=r"d.csv has no column 'text'; its columns are 'review', 'stars'\. "
                                        r"Pass --text-column"):
        docs_of([tmp_path / "d.csv"])
    with pytest.raises(DataError, match=r"has no column 'label'; its columns are 'review', 'stars'"):
        docs_of([tmp_path / "d.csv"], text_column="review", require_label=True)
    assert docs_of([tmp_path / "d.csv"], text_column="review", label_column="stars")[0].label == "5"


def test_require_label(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"d.jsonl:2 has no 'label' key"):
        docs_of([tmp_path / "d.jsonl"], require_label=True)
    (tmp_path / "t.txt").write_text("no label here")
    with pytest.raises(DataError, match=r"t.txt is a plain-text file, which has no 'label' label"):
        docs_of([tmp_path / "t.txt"], require_label=True)


def test_csv_short_row_and_bad_quoting(tmp_path):
    (tmp_path / "d.csv").write_text("id,text\n1,fine\n2\n")
    with pytest.raises(DataError, match=r"d.csv:3: the row has 1 field\(s\) but the header has 2"):
        docs_of([tmp_path / "d.csv"])


def test_all_documents_empty(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": " \n "}])
    (tmp_path / "e.csv").write_text('text\n""\n')
    with pytest.raises(DataError, match="all 3 documents are empty"):
        docs_of([tmp_path])
    (tmp_path / "f.txt").write_text("\x07\x08\n")  # only control characters
    with pytest.raises(DataError, match="all 4 documents are empty after cleaning"):
        docs_of([tmp_path], clean=True)


def test_bad_normalize_value(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="--normalize must be one of none, nfc, nfkc"):
        docs_of([tmp_path], normalize="NFD")
