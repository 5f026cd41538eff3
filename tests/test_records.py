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
