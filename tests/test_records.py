"""Reading rows and detecting schemas."""

import json

import pytest

from antidote_llm.data.records import load_pairs, read_records
from antidote_llm.errors import AntidoteError

ROWS = [{"prompt": f"p{i}", "response": f"r{i}", "is_safe": i % 3 == 0} for i in range(9)]


@pytest.fixture(params=["json", "jsonl", "csv", "tsv", "parquet"])
def data_file(request, tmp_path):
    fmt = request.param
    path = tmp_path / f"rows.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("\n".join([sep.join(ROWS[0])] + [sep.join(str(v) for v in r.values()) for r in ROWS]))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


def test_every_format_reads_the_same_pairs_and_filters_beavertails_safety(data_file):
    pairs = load_pairs(data_file)
    assert [p.prompt for p in pairs.pairs] == [r["prompt"] for r in ROWS if not r["is_safe"]]
    safe = load_pairs(data_file, safety="safe")
    assert [p.prompt for p in safe.pairs] == ["p0", "p3", "p6"]
    assert len(load_pairs(data_file, safety=None)) == 9


def test_instruction_input_output_schema(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Do", "input": "this", "output": "done"}]))
    pair = load_pairs(path).pairs[0]
    assert (pair.prompt, pair.input, pair.response) == ("Do", "this", "done")


def test_advbench_style_fields_are_detected_case_insensitively(tmp_path):
    path = tmp_path / "refusals.csv"
    path.write_text("Behavior,Safe_Response\nDo harm,I cannot help.\n")
    pair = load_pairs(path).pairs[0]
    assert (pair.prompt, pair.response) == ("Do harm", "I cannot help.")


def test_skip_exclude_seed_and_samples_select_a_disjoint_window(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": f"p{i}", "response": "r"} for i in range(20)]))
    first = load_pairs(path, samples=5)
    rest = load_pairs(path, skip=5, seed=1, samples=5)
    assert first.indices == (0, 1, 2, 3, 4)
    assert not set(first.indices) & set(rest.indices)
    assert rest.indices == load_pairs(path, skip=5, seed=1, samples=5).indices  # seeded
    assert rest.sha256 == load_pairs(path, skip=5, seed=1, samples=5).sha256
    assert rest.sha256 != first.sha256
    excluded = load_pairs(path, exclude=range(0, 20, 2))
    assert all(i % 2 == 1 for i in excluded.indices)


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("[1, 2]", "x.json", "list of records"),
        ("{not json", "x.json", "cannot parse"),
        ("[]", "x.json", "no rows"),
        ('[{"a": 1}]', "x.json", "cannot find prompt and response fields among a"),
        ("a", "x.txt", "unknown data format"),
    ],
)
def test_bad_data_is_one_clear_error(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(AntidoteError, match=message):
        load_pairs(path)


def test_hub_source_failure_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AntidoteError, match="cannot load hub dataset"):
        read_records("hf:PKU-Alignment/BeaverTails:30k_train")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf:org/data", ("org/data", None, "train")),
        ("hf:org/data:test", ("org/data", None, "test")),
        ("hf:openai/gsm8k:main:test", ("openai/gsm8k", "main", "test")),
    ],
)
def test_hub_sources_name_dataset_config_and_split(monkeypatch, spec, expected):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: calls.append((name, config, split)) or [{"prompt": "p"}])
    assert read_records(spec) == [{"prompt": "p"}]
    assert calls == [expected]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "response": None}, "field 'response' is null; every row needs a string"),
        ({"prompt": 5, "response": "r"}, r"field 'prompt' is a number \(5\); every row needs a string"),
        ({"prompt": "p"}, "field 'response' is missing"),
        ({"prompt": ["a"], "response": "r"}, "field 'prompt' is a list"),
        ({"prompt": "p", "response": "r", "input": {"a": 1}}, "field 'input' is an object; it must be a string or null"),
    ],
)
def test_a_row_whose_fields_are_not_strings_is_refused_by_its_line(tmp_path, row, message):
    path = tmp_path / "data.jsonl"
    good = {"prompt": "p", "response": "r", "input": ""}
    path.write_text("\n".join([json.dumps(good), "", json.dumps(row), json.dumps(good)]))  # row on line 3
    with pytest.raises(AntidoteError, match=rf"^{path} line 3: {message}") as caught:
        load_pairs(path, safety=None)
    assert "\n" not in str(caught.value) and "fix or remove that row" in str(caught.value)


def test_rows_without_line_numbers_are_named_by_position(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}]))
    with pytest.raises(AntidoteError, match=rf"^{path} row 2: field 'response' is null"):
        load_pairs(path)
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("prompt,response\na,b\n\"multi\nline\",c\nshort\n")  # the short row lacks a response
    with pytest.raises(AntidoteError, match=rf"^{csv_path} line 5: field 'response' is missing"):
        load_pairs(csv_path)


def test_a_row_filtered_by_safety_is_still_named_by_its_place_in_the_file(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "a", "response": "b", "is_safe": True}, {"prompt": "c", "response": 7, "is_safe": False}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(AntidoteError, match="line 2: field 'response' is a number"):
        load_pairs(path)
    path.write_text("\n".join(json.dumps(r) for r in [rows[0], {"prompt": "c", "response": "d"}]))
    with pytest.raises(AntidoteError, match="line 2: field 'is_safe' is missing"):
        load_pairs(path)


def test_optional_input_and_ignored_responses_may_be_absent(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "a", "input": None, "response": None}, {"prompt": "b", "response": 3}, {"prompt": "c"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs(path, require_response=False).pairs  # prompts only, e.g. evaluation prompts
    assert [(p.prompt, p.input, p.response) for p in pairs] == [("a", "", ""), ("b", "", ""), ("c", "", "")]
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    assert [p.prompt for p in load_pairs(prompts_only, require_response=False).pairs] == ["x", "y"]


def test_a_broken_jsonl_line_is_named_by_its_line_in_the_file(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "response": "r"}) for i in range(5)] + ["", '{"prompt": }']
    path.write_text("\n".join(lines))
    with pytest.raises(AntidoteError, match=rf"^{path} line 7: not valid JSON \(Expecting value at column 12\)"):
        read_records(path)
    path.write_text('{"prompt": "p", "response": "r"}\n[1, 2]\n')
    with pytest.raises(AntidoteError, match=rf"^{path} line 2: holds a list, not a record"):
        read_records(path)


def test_a_csv_saved_by_excel_with_a_byte_order_mark_reads_its_first_field(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("prompt,response\nHow do I do it?,Like this.\n".encode("utf-8-sig"))
    (pair,) = load_pairs(str(path), prompt_field="prompt").pairs
    assert (pair.prompt, pair.response) == ("How do I do it?", "Like this.")


def test_a_hub_source_without_a_name_is_one_line():
    with pytest.raises(AntidoteError, match="names no dataset"):
        load_pairs("hf:")
