"""The data path: files -> records -> examples -> token rows -> batches (no model needed)."""

from __future__ import annotations

import importlib.util
import json
import random
import re

import pytest
import torch
from conftest import make_tokenizer

from softprompt.config import DataConfig
from softprompt.data import Example, load_examples, read_records, split_validation
from softprompt.errors import ConfigError, DataError
from softprompt.rows import IGNORE_INDEX, Row, batch_order, collate, tokenize

BOS, EOS, PAD = 2, 1, 0
CFG = DataConfig(data="unused")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def _ids(tok, text, special=True):
    return tok(text, add_special_tokens=special)["input_ids"]


def _pairs(*pairs):
    return [Example(s, t, "w") for s, t in pairs]


# --- reading --------------------------------------------------------------------------


def test_jsonl_records_and_locations(tmp_path):
    """JSONL: one object per line, blank lines skipped but counted; non-strings are JSON."""
    path = _write(
        tmp_path, "d.jsonl", '{"input": "a", "target": "b"}\n\n{"input": 5, "target": true}\n'
    )
    assert list(read_records(str(path))) == [
        ({"input": "a", "target": "b"}, f"{path}:1"),
        ({"input": 5, "target": True}, f"{path}:3"),
    ]
    exs = load_examples(str(path), CFG)
    assert [(e.source, e.target, e.where) for e in exs] == [
        ("a", "b", f"{path}:1"),
        ("5", "true", f"{path}:3"),
    ]


@pytest.mark.parametrize("name,sep", [("d.csv", ","), ("d.tsv", "\t")])
def test_csv_tsv_quoted_comma_and_newline(tmp_path, name, sep):
    """CSV/TSV: a quoted field keeps its comma and newline; where is the record's last line."""
    text = f'input{sep}target\n"hello, world\nsecond line"{sep}positive\nplain{sep}negative\n'
    path = _write(tmp_path, name, text)
    exs = load_examples(str(path), CFG)
    assert [(e.source, e.target, e.where) for e in exs] == [
        ("hello, world\nsecond line", "positive", f"{path}:3"),
        ("plain", "negative", f"{path}:4"),
    ]


def test_csv_utf8_bom_is_stripped(tmp_path):
    """A UTF-8 BOM (Excel) does not end up in the first header name."""
    path = _write(tmp_path, "d.csv", "input,target\nx,y\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert list(read_records(str(path))) == [({"input": "x", "target": "y"}, f"{path}:2")]


def test_jsonl_utf8_bom_is_stripped(tmp_path):
    """A BOM in a JSONL file should be tolerated as it is in CSV."""
    path = _write(tmp_path, "d.jsonl", '{"input": "x", "target": "y"}\n', encoding="utf-8-sig")
    assert list(read_records(str(path))) == [({"input": "x", "target": "y"}, f"{path}:1")]


def test_txt_plain_text_one_example_per_line(tmp_path):
    """.txt: each non-empty line is one plain-text example (target None), line numbers kept."""
    path = _write(tmp_path, "d.txt", "first line\n\n   \nsecond line\n")
    exs = load_examples(str(path), CFG)
    assert [(e.source, e.target, e.where) for e in exs] == [
        ("first line", None, f"{path}:1"),
        ("second line", None, f"{path}:4"),
    ]


# --- errors ---------------------------------------------------------------------------


def test_malformed_json_names_file_and_line(tmp_path):
    """Bad JSON on line 3 gives a DataError naming file:3 and what a line must hold."""
    path = _write(tmp_path, "d.jsonl", '{"input": "a", "target": "b"}\n\n{"input": oops}\n')
    with pytest.raises(DataError, match="not valid JSON") as exc:
        load_examples(str(path), CFG)
    assert f"{path}:3:" in str(exc.value) and "one JSON object" in str(exc.value)


def test_json_line_not_an_object(tmp_path):
    """A JSON list on line 2 is rejected with its type and location."""
    path = _write(tmp_path, "d.jsonl", '{"input": "a", "target": "b"}\n[1, 2]\n')
    with pytest.raises(DataError) as exc:
        load_examples(str(path), CFG)
    assert str(exc.value) == f"{path}:2: expected a JSON object, got list"


@pytest.mark.parametrize("row", ["only_one", "a,b,extra"])
def test_csv_wrong_field_count(tmp_path, row):
    """A CSV row with too few or too many fields names file:line and the header."""
    path = _write(tmp_path, "d.csv", f"input,target\nx,y\n{row}\n")
    with pytest.raises(DataError) as exc:
        load_examples(str(path), CFG)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:3: row has a different number of fields")
    assert "(2: input, target)" in msg


@pytest.mark.parametrize(
    "kwargs,flag,name",
    [
        ({}, "--input-field", "input"),
        ({"input_field": "review"}, "--target-field", "target"),
        ({"text_field": "body"}, "--text-field", "body"),
    ],
)
def test_missing_field_lists_found_fields_and_flag(tmp_path, kwargs, flag, name):
    """A missing field names file:line, the fields that exist, and the flag to set."""
    path = _write(tmp_path, "d.jsonl", '{"review": "r", "label": "l"}\n')
    with pytest.raises(DataError) as exc:
        load_examples(str(path), DataConfig(data="x", **kwargs))
    assert (
        str(exc.value)
        == f"{path}:1: no field {name!r} (fields found: 'review', 'label'); set {flag}"
    )


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_holds_no_examples(tmp_path, content):
    """An empty (or blank) file is an error, not a silent zero-step run."""
    path = _write(tmp_path, "d.jsonl", content)
    with pytest.raises(DataError, match="holds no examples") as exc:
        load_examples(str(path), CFG)
    assert str(path) in str(exc.value)


def test_unknown_suffix(tmp_path):
    """An unsupported suffix lists the supported ones."""
    path = _write(tmp_path, "d.xml", "<x/>")
    with pytest.raises(DataError) as exc:
        load_examples(str(path), CFG)
    assert str(exc.value) == (
        f"{path}: unknown data format '.xml'; use one of .jsonl, .json, .csv, .tsv, .txt"
    )


def test_missing_file(tmp_path):
    """A missing file is named, with the formats that are accepted."""
    spec = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=re.escape(f"data file {spec} not found; give a .jsonl")):
        load_examples(spec, CFG)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_hub_spec_without_datasets_names_extra():
    """hf:NAME without the datasets package says which extra to install."""
    with pytest.raises(DataError, match=r"softprompt\[hub\]") as exc:
        load_examples("hf:imdb:train", CFG)
    assert "hf:imdb:train needs the 'datasets' package" in str(exc.value)


# --- templates and modes --------------------------------------------------------------


def test_template_substitutes_input_fields_and_braces(tmp_path):
    """{input} is the input field, other names are record fields, {{ }} are literal braces."""
    rec = {"review": "good film", "label": "positive", "topic": "movies", "n": 3}
    path = _write(tmp_path, "d.jsonl", json.dumps(rec) + "\n")
    cfg = DataConfig(
        data="x",
        input_field="review",
        target_field="label",
        template="[{topic}/{n}] {{Review}}: {input}\nSentiment:",
    )
    (ex,) = load_examples(str(path), cfg)
    assert ex.source == "[movies/3] {Review}: good film\nSentiment:"
    assert ex.target == "positive"


def test_template_unknown_placeholder(tmp_path):
    """An unknown {name} is a DataError naming it, the location and the record's fields."""
    path = _write(tmp_path, "d.jsonl", '{"input": "a", "target": "b"}\n')
    cfg = DataConfig(data="x", template="Q: {question} {input}")
    with pytest.raises(DataError) as exc:
        load_examples(str(path), cfg)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:1: template field {{question}} is not in the record")
    assert "(fields: input, target)" in msg


@pytest.mark.parametrize("template", ["Review: {input", "Review: {}", "a } b {input}"])
def test_template_malformed_braces_is_config_error(template):
    """An unbalanced brace or an empty {} is refused when the config is made, naming
    --template, before any data or model is read."""
    with pytest.raises(ConfigError, match="template"):
        DataConfig(data="x", template=template)


def test_template_record_text_field_not_shadowed(tmp_path):
    """In pair mode {text} should be the record's own 'text' field, not the input."""
    path = _write(tmp_path, "d.jsonl", '{"input": "I", "target": "T", "text": "CTX"}\n')
    (ex,) = load_examples(str(path), DataConfig(data="x", template="{text} | {input}"))
    assert ex.source == "CTX | I"


def test_plain_text_mode_selection(tmp_path):
    """text_field selects plain text; 'text' without the input field selects it too."""
    path = _write(tmp_path, "d.jsonl", '{"body": "hello", "input": "i", "target": "t"}\n')
    (ex,) = load_examples(str(path), DataConfig(data="x", text_field="body", template="> {text}"))
    assert (ex.source, ex.target) == ("> hello", None)
    auto = _write(tmp_path, "a.jsonl", '{"text": "just text"}\n')
    (ex,) = load_examples(str(auto), CFG)
    assert (ex.source, ex.target) == ("just text", None)
    both = _write(tmp_path, "b.jsonl", '{"text": "ctx", "input": "i", "target": "t"}\n')
    (ex,) = load_examples(str(both), CFG)
    assert (ex.source, ex.target) == ("i", "t")


# --- tokenize -------------------------------------------------------------------------


def test_tokenize_pair_labels_target_and_eos(tok, capsys):
    """Source tokens get IGNORE_INDEX; the target and an appended eos get their ids."""
    (row,) = tokenize([Example("the movie was", "great", "w")], tok, 64)
    assert row.input_ids == _ids(tok, "the movie was great") + [EOS]
    assert row.input_ids[0] == BOS
    n_src = len(_ids(tok, "the movie was"))
    assert row.labels == [IGNORE_INDEX] * n_src + _ids(tok, "great", False) + [EOS]
    assert capsys.readouterr().err == ""  # nothing cut, nothing said


def test_tokenize_delimiter_only_without_trailing_whitespace(tok):
    """The delimiter is put between source and target unless the source ends in whitespace."""
    exs = _pairs(
        ("the movie was", "great"), ("the movie was ", "great"), ("the movie was\n", "great")
    )
    a, b, c = tokenize(exs, tok, 64, delimiter="!")
    assert a.input_ids == _ids(tok, "the movie was!great") + [EOS]
    assert tok.decode(a.input_ids) == "<bos> the movie was ! great <eos>"
    assert a.labels[-3:] == _ids(tok, "! great", False) + [EOS]
    assert b.input_ids == c.input_ids == _ids(tok, "the movie was great") + [EOS]


def test_tokenize_plain_text_labels_all_but_bos(tok):
    """Plain text: every token is a label except the leading BOS; no eos is added."""
    (row,) = tokenize([Example("the movie was great", None, "w")], tok, 64)
    ids = _ids(tok, "the movie was great")
    assert row.input_ids == ids
    assert row.labels == [IGNORE_INDEX] + ids[1:]


def test_tokenize_truncation_keeps_bos_and_target(tok, capsys):
    """A long row is cut to exactly the limit from the source's start; the warning counts it."""
    long_src = "the movie was great and the food was awful"
    exs = _pairs((long_src, "positive"), ("boring", "negative"), (f"{long_src} {long_src}", None))
    rows = tokenize(exs, tok, 6)
    src_ids = _ids(tok, long_src)
    assert rows[0].input_ids == [BOS] + src_ids[-3:] + _ids(tok, "positive", False) + [EOS]
    assert rows[0].labels == [IGNORE_INDEX] * 4 + _ids(tok, "positive", False) + [EOS]
    assert rows[1].input_ids == _ids(tok, "boring negative") + [EOS]
    assert rows[2].input_ids == _ids(tok, long_src)[:6] and rows[2].labels[0] == IGNORE_INDEX
    err = capsys.readouterr().err
    assert "[softprompt] warning: 2 of 3 rows were longer than 6 text tokens" in err
    assert "--max-length" in err


def test_tokenize_cuts_a_long_head_before_the_marker_and_keeps_the_answer(tok, capsys):
    """A template with {soft_prompt} after the input puts the input in the head: a long row is
    cut from the head's text (BOS kept), so the target survives and the row is counted."""
    long_src = "the movie was great and the food was awful"
    ex = Example("so", "positive", "w", head=long_src)
    (row,) = tokenize([ex], tok, 8)
    head, rest = _ids(tok, long_src), _ids(tok, "so", False)
    target = _ids(tok, "positive", False) + [EOS]
    keep = 8 - len(rest) - len(target) - 1  # the head's text tokens that fit beside BOS
    assert row.input_ids == [BOS] + head[len(head) - keep :] + rest + target
    assert row.labels == [IGNORE_INDEX] * (1 + keep + len(rest)) + target
    assert row.prompt_at == 1 + keep  # the virtual tokens still go where the marker was
    assert "1 of 1 rows were longer than 8 text tokens" in capsys.readouterr().err


def test_tokenize_keeps_an_instruction_head_and_cuts_the_input_after_the_marker(tok, capsys):
    """An instruction before {soft_prompt} and the input after it: the input's start is cut,
    the instruction kept (the head is cut only when the input is there)."""
    long_src = "the movie was great and the food was awful"
    (row,) = tokenize([Example(long_src, "positive", "w", head="so")], tok, 8)
    head, body = _ids(tok, "so"), _ids(tok, long_src, False)
    target = _ids(tok, "positive", False) + [EOS]
    keep = 8 - len(head) - len(target)
    assert row.input_ids == head + body[len(body) - keep :] + target
    assert row.prompt_at == len(head)
    assert "1 of 1 rows were longer than 8 text tokens" in capsys.readouterr().err


def test_tokenize_overlong_target_still_fits(tok):
    """A target longer than the limit is cut so the row fits, keeping BOS and a source token."""
    target = " ".join(["good"] * 8)
    (row,) = tokenize([Example("the movie", target, "w")], tok, 5)
    good = _ids(tok, "good", False)[0]
    assert row.input_ids == [BOS, _ids(tok, "movie", False)[0], good, good, good]
    assert row.labels == [IGNORE_INDEX, IGNORE_INDEX, good, good, good]


# --- split, order, collate ------------------------------------------------------------


def _exs(n):
    return [Example(f"s{i}", f"t{i}", f"f:{i}") for i in range(n)]


@pytest.mark.parametrize("n,fraction", [(20, 0.25), (10, 0.1), (7, 0.5)])
def test_split_validation_sizes_disjoint_deterministic(n, fraction):
    """round(n*fraction) held out, disjoint, order kept, same split for the same seed."""
    exs = _exs(n)
    train, val = split_validation(exs, fraction, seed=3)
    assert len(val) == round(n * fraction) and len(train) == n - len(val)
    assert sorted(e.where for e in train + val) == sorted(e.where for e in exs)
    assert train == sorted(train, key=exs.index) and val == sorted(val, key=exs.index)
    assert split_validation(exs, fraction, seed=3) == (train, val)


def test_split_validation_seed_changes_split():
    """Different seeds hold out different examples."""
    exs = _exs(40)
    vals = {tuple(e.where for e in split_validation(exs, 0.25, seed=s)[1]) for s in range(5)}
    assert len(vals) > 1


@pytest.mark.parametrize("n,fraction", [(3, 0.1), (2, 0.9)])
def test_split_validation_too_few_warns(capsys, n, fraction):
    """Too few examples to hold any (or all but none) out: no validation, and a warning."""
    exs = _exs(n)
    assert split_validation(exs, fraction, seed=0) == (exs, [])
    assert f"{n} examples are too few to hold out" in capsys.readouterr().err


def test_split_validation_zero_fraction_is_silent(capsys):
    """fraction 0 means no validation, without a warning."""
    exs = _exs(5)
    assert split_validation(exs, 0.0, seed=0) == (exs, [])
    assert capsys.readouterr().err == ""


def test_batch_order_covers_each_index_once_deterministically():
    """Every index exactly once per epoch; same (seed, epoch) same order; epochs differ."""
    lengths = [random.Random(7).randint(1, 100) for _ in range(203)]
    b0 = batch_order(lengths, 4, seed=1, epoch=0)
    assert sorted(i for b in b0 for i in b) == list(range(203))
    assert all(1 <= len(b) <= 4 for b in b0)
    assert batch_order(lengths, 4, seed=1, epoch=0) == b0
    assert batch_order(lengths, 4, seed=1, epoch=1) != b0
    assert batch_order(lengths, 4, seed=2, epoch=0) != b0


def test_batch_order_groups_similar_lengths():
    """Within one pool, batches are slices of a length sort: far less spread than random."""
    rng = random.Random(0)
    lengths = [rng.randint(1, 200) for _ in range(200)]  # one pool of 4 * 50
    batches = batch_order(lengths, 4, seed=0, epoch=0)
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sum(spread) <= max(lengths) - min(lengths)
    idx = list(range(200))
    rng.shuffle(idx)
    rand = [idx[i : i + 4] for i in range(0, 200, 4)]
    rand_spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in rand]
    assert sum(spread) * 10 < sum(rand_spread)


def test_batch_order_no_shuffle_is_sequential():
    """shuffle=False gives batches in index order, the last one short."""
    assert batch_order([5] * 10, 4, seed=0, epoch=3, shuffle=False) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]


def test_collate_right_pads_with_mask_and_ignored_labels():
    """Right padding to the longest row; mask 1 on real tokens; labels -100 on padding;
    each row's task index (multi-task runs) alongside."""
    rows = [
        Row([2, 5, 6], [IGNORE_INDEX, 5, 6], task=1),
        Row([2, 7, 8, 9, 1], [IGNORE_INDEX] * 3 + [9, 1]),
    ]
    batch = collate(rows, pad_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task"}
    assert batch["task"].tolist() == [1, 0]
    assert all(batch[k].shape == (2, 5) for k in ("input_ids", "attention_mask", "labels"))
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[2, 5, 6, 0, 0], [2, 7, 8, 9, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, -100], [-100, -100, -100, 9, 1]]
