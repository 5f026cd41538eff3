"""The to-disk shell (`output_run`) and the model saver (`save_model`) every command writes through."""

import json

import pytest

from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.outputs import output_run, save_model, write_json
from antidote_llm.runtime.runinfo import Timings
from conftest import add_lora, make_model, make_tokenizer


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_a_finished_run_renames_its_folder_into_place_and_reports_how_it_ran(tmp_path):
    out = tmp_path / "out"
    with output_run(out) as run:
        with run.timings.measure("work_s"):
            write_json(run.folder / "result.json", {"ok": True})
        assert not out.exists()  # nothing at the output until the run ends
        fields = run.report_fields()
    assert json.loads((out / "result.json").read_text()) == {"ok": True}
    assert _leftovers(tmp_path) == ["out"]
    assert set(fields) == {"timings", "memory", "versions", "started_at"} and "work_s" in fields["timings"]
    assert fields["memory"].peak_rss_bytes >= fields["memory"].rss_start_bytes > 0


def test_a_failure_inside_leaves_no_output_and_no_temporary_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), output_run(out) as run:
        write_json(run.folder / "half.json", {})
        raise RuntimeError("boom")
    assert _leftovers(tmp_path) == []


def test_a_failure_keeps_the_folder_it_would_have_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), output_run(out, overwrite=True) as run:
        write_json(run.folder / "new.json", {})
        raise RuntimeError("boom")
    assert _leftovers(tmp_path) == ["out"] and _leftovers(out) == ["old.txt"]


def test_a_non_empty_output_is_refused_before_the_block_runs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(AntidoteError, match="not empty; choose another --out or pass --overwrite"), output_run(out):
        pytest.fail("the block ran")
    with output_run(out, overwrite=True) as run:
        write_json(run.folder / "new.json", {})
    assert _leftovers(out) == ["new.json"]


def test_an_input_is_never_the_output(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for out in (model_dir, model_dir / "inside", tmp_path):
        with pytest.raises(AntidoteError, match="overlaps the input"), output_run(out, overwrite=True, inputs=[model_dir]):
            pytest.fail("the block ran")
    assert _leftovers(tmp_path) == ["model"]


def test_a_run_that_writes_nothing_leaves_nothing(tmp_path):
    with output_run(tmp_path / "out"):
        pass
    assert _leftovers(tmp_path) == []


def test_save_model_writes_an_adapter_beside_its_merged_model_or_a_whole_model(tmp_path):
    from peft import PeftModel

    timings = Timings()
    outputs, merged = save_model(tmp_path / "a", add_lora(make_model()), make_tokenizer(), timings, adapter=True,
                                 merged=True)
    assert outputs == {"adapter": "adapter", "merged": "merged", "merge_dtype": "float32"}
    assert (tmp_path / "a" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "a" / "merged" / "config.json").is_file() and not isinstance(merged, PeftModel)
    assert {"save_s", "merge_s"} <= set(timings)

    outputs, _ = save_model(tmp_path / "m", make_model(), make_tokenizer(), timings, adapter=False)
    assert outputs == {"model": "model"}
    assert _leftovers(tmp_path / "m" / "model") and not (tmp_path / "m" / "adapter").exists()


def test_a_folder_written_meanwhile_by_another_run_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AntidoteError, match="written by another run meanwhile"), output_run(out) as run:
        write_json(run.folder / "mine.json", {})
        out.mkdir()  # another run finished first
        write_json(out / "theirs.json", {})
    assert _leftovers(out) == ["theirs.json"] and _leftovers(tmp_path) == ["out"]
    with output_run(out, overwrite=True) as run:  # asked for: replaced
        write_json(run.folder / "mine.json", {})
    assert _leftovers(out) == ["mine.json"]


def test_two_realign_processes_to_one_output_write_it_once(tmp_path, tiny_model_dir, harmful_file):
    """Real processes, no mock: of two runs racing to one --out, one writes and the other says so."""
    import subprocess
    import sys

    out = tmp_path / "o"
    runs = [subprocess.Popen([sys.executable, "-m", "antidote_llm", "realign", "--model", str(tiny_model_dir),
                              "--device", "cpu", "--data", str(harmful_file), "--template", "plain", "--ratio", ratio,
                              "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for ratio in ("0.2", "0.05")]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2]
    (loser,) = [err for code, err in results if code == 2]
    assert len(loser.strip().splitlines()) == 1 and str(out) in loser
    winner = ("0.2", "0.05")[[code for code, _ in results].index(0)]
    assert json.loads((out / "report.json").read_text())["method"]["ratio"] == float(winner)
    assert not [name for name in _leftovers(tmp_path) if name.startswith(".o.")]  # no temporary folder left


def test_an_output_that_cannot_be_written_is_refused_before_any_work():
    from pathlib import Path

    from antidote_llm.runtime.outputs import check_output_dir

    read_only = Path("/proc/antidote-test-output")  # /proc takes no files, even from root
    with pytest.raises(AntidoteError, match="cannot write in /proc"):
        check_output_dir(read_only)


def _left_by_a_killed_run(folder, age_s: float):
    """A hidden temporary folder with a half-written file, last touched `age_s` ago (as kill -9 leaves one)."""
    import os
    import time

    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(b"\0" * 10)
    when = time.time() - age_s
    for path in (folder / "model" / "model.safetensors", folder / "model", folder):
        os.utime(path, (when, when))
    return folder


def test_temporary_folders_a_killed_run_left_over_a_day_ago_are_removed_by_the_next_write(tmp_path):
    day = 24 * 3600
    stale = _left_by_a_killed_run(tmp_path / ".out.tmp-k1ll3d", 2 * day)
    recent = _left_by_a_killed_run(tmp_path / ".out.tmp-l1v3", day / 2)  # may belong to a run still going
    other = _left_by_a_killed_run(tmp_path / ".other.tmp-k1ll3d", 2 * day)  # another output's
    touched = _left_by_a_killed_run(tmp_path / ".out.tmp-t0uch", 2 * day)
    (touched / "model" / "more.safetensors").write_bytes(b"\0")  # a file written just now: a live run's
    with output_run(tmp_path / "out") as run:
        write_json(run.folder / "result.json", {"ok": True})
    assert not stale.exists()
    assert recent.exists() and other.exists() and touched.exists()
    assert _leftovers(tmp_path) == sorted([".other.tmp-k1ll3d", ".out.tmp-l1v3", ".out.tmp-t0uch", "out"])
