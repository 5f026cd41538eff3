"""`antidote realign` / `apply-mask` end to end on disk, and every bad input: exit 2, nothing written."""

import json

import pytest
import torch
from safetensors.torch import load_file

from antidote_llm.cli.main import main
from antidote_llm.core.report import RealignReport
from conftest import save_adapter, save_model


@pytest.fixture
def setup(tmp_path, harmful_file):
    base = save_model(tmp_path / "base")
    adapter = save_adapter(tmp_path / "adapter", base)
    return tmp_path, base, adapter, harmful_file


def run(*args):
    return main([*map(str, args)])


def test_adapter_mode_output_reloads_to_base_plus_masked_adapter(setup, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, base, adapter, data = setup
    out = tmp / "out"
    assert run("realign", "--model", base, "--adapter", adapter, "--data", data, "--ratio", 0.1, "--out", out, "--quiet", "--save-merged") == 0
    assert "pruned" in capsys.readouterr().out
    masks = load_file(out / "mask.safetensors")
    assert masks and all("lora_" in k and v.dtype == torch.bool for k, v in masks.items())

    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    expected = dict(original.named_parameters())
    for name, mask in masks.items():
        expected[name].data[mask] = 0
    expected_merged = original.merge_and_unload().state_dict()

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter")
    for name, mask in masks.items():
        value = dict(reloaded.named_parameters())[name]
        assert (value[mask] == 0).all() and mask.any()
    reloaded_merged = reloaded.merge_and_unload().state_dict()
    saved_merged = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    for key, value in expected_merged.items():
        torch.testing.assert_close(reloaded_merged[key], value)
        torch.testing.assert_close(saved_merged[key], value)

    report = json.loads((out / "report.json").read_text())
    for key in ("method", "data", "modules", "totals", "timings", "memory", "versions", "seed"):
        assert key in report
    assert set(report["timings"]) >= {"load_s", "scoring_s", "selection_s", "save_s"}
    assert report["data"]["rows"] == 12 and len(report["data"]["sha256"]) == 64
    assert report["method"]["targets"] == ["adapter"]
    assert RealignReport.model_validate(report).totals.pruned > 0  # the file follows the typed schema
    assert report["memory"]["peak_rss_bytes"] >= report["memory"]["rss_start_bytes"] > 0
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_two_adapters_merge_the_first_and_prune_the_second(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, base, align_adapter, data = setup
    ft_adapter = save_adapter(tmp / "ft", base, seed=7)
    out = tmp / "out"
    assert run("realign", "--model", base, "--adapter", align_adapter, "--adapter", ft_adapter, "--data", data, "--ratio", 0.2, "--out", out, "--quiet") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"]["base"]["merged_adapters"] == [str(align_adapter)]
    aligned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), align_adapter).merge_and_unload()
    masks = load_file(out / "mask.safetensors")
    reloaded = PeftModel.from_pretrained(aligned, out / "adapter")
    original_ft = dict(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ft_adapter).named_parameters())
    for name, mask in masks.items():
        value = dict(reloaded.named_parameters())[name]
        torch.testing.assert_close(value, original_ft[name].masked_fill(mask, 0))


def test_full_mode_saves_a_model_and_apply_mask_reproduces_it(setup):
    from transformers import AutoModelForCausalLM

    tmp, base, _, data = setup
    out = tmp / "full"
    assert run("realign", "--model", base, "--data", data, "--ratio", 0.05, "--targets", "qkv", "--out", out, "--quiet") == 0
    masks = load_file(out / "mask.safetensors")
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    pruned = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    for key, value in original.items():
        expected = value.masked_fill(masks[key], 0) if key in masks else value
        assert torch.equal(pruned[key], expected), key
    assert (out / "model" / "tokenizer.json").is_file()

    again = tmp / "again"
    assert run("apply-mask", "--model", base, "--mask", out / "mask.safetensors", "--out", again) == 0
    reapplied = AutoModelForCausalLM.from_pretrained(again / "model").state_dict()
    for key, value in pruned.items():
        assert torch.equal(reapplied[key], value)


def test_revert_through_the_cli(setup):
    from transformers import AutoModelForCausalLM

    tmp, base, _, data = setup
    finetuned = save_model(tmp / "finetuned", seed=9)
    out = tmp / "reverted"
    assert run("realign", "--model", finetuned, "--data", data, "--ratio", 0.1, "--action", "revert", "--aligned-model", base, "--out", out, "--quiet") == 0
    masks = load_file(out / "mask.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(base).state_dict()
    ft = AutoModelForCausalLM.from_pretrained(finetuned).state_dict()
    got = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    for key, mask in masks.items():
        assert torch.equal(got[key], torch.where(mask, ref[key], ft[key]))


def test_protection_through_the_cli(setup, tmp_path):
    tmp, base, adapter, data = setup
    benign = tmp / "benign.jsonl"
    benign.write_text("\n".join(json.dumps({"instruction": f"Name a color number {i}."}) for i in range(6)))
    out = tmp / "protected"
    assert run("realign", "--model", base, "--adapter", adapter, "--data", data, "--ratio", 0.2,
               "--protect-data", benign, "--protect-ratio", 0.1, "--out", out, "--quiet") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["pruned"] == report["totals"]["selected"] - report["totals"]["spared_by_protection"]
    assert report["protection"]["rows"] == 6


def test_overwrite_replaces_a_non_empty_output(setup):
    tmp, base, _, data = setup
    out = tmp / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert run("realign", "--model", base, "--data", data, "--ratio", 0.1, "--out", out, "--quiet") == 2
    assert run("realign", "--model", base, "--data", data, "--ratio", 0.1, "--out", out, "--quiet", "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "mask.safetensors").is_file()


BAD_INPUTS = {
    "missing model": lambda t: ["--model", t / "nope", "--data", t / "harmful.json"],
    "model not a model dir": lambda t: ["--model", t / "not-a-model", "--data", t / "harmful.json"],
    "missing data": lambda t: ["--model", t / "base", "--data", t / "missing.json"],
    "unknown format": lambda t: ["--model", t / "base", "--data", t / "data.xml"],
    "fields absent": lambda t: ["--model", t / "base", "--data", t / "wrong_fields.json"],
    "named field absent": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--prompt-field", "question"],
    "zero rows after filtering": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--skip", "100"],
    "empty data": lambda t: ["--model", t / "base", "--data", t / "empty.json"],
    "ratio zero": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--ratio", "0"],
    "ratio one": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--ratio", "1"],
    "targets match nothing": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--targets", "nothing.*"],
    "adapter target without adapter": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--targets", "adapter"],
    "missing adapter": lambda t: ["--model", t / "base", "--adapter", t / "no-adapter", "--data", t / "harmful.json"],
    "adapter does not fit": lambda t: ["--model", t / "base", "--adapter", t / "wide-adapter", "--data", t / "harmful.json"],
    "aligned model does not fit": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--action", "revert", "--aligned-model", t / "wide"],
    "revert without aligned model": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--action", "revert"],
    "wanda without data": lambda t: ["--model", t / "base"],
    "protect ratio without data": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--protect-ratio", "0.1"],
    "output equals input": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--out", t / "base"],
    "output inside input": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--out", t / "base" / "sub"],
    "output not empty": lambda t: ["--model", t / "base", "--data", t / "harmful.json", "--out", t / "full-out"],
    "nan weights": lambda t: ["--model", t / "nan", "--data", t / "harmful.json"],
}


@pytest.fixture(scope="module")
def bad_input_dir(tmp_path_factory):
    from conftest import HARMFUL_ROWS, make_model

    t = tmp_path_factory.mktemp("bad")
    save_model(t / "base")
    save_model(t / "wide", hidden=32)
    save_adapter(t / "wide-adapter", t / "wide")
    nan = make_model()
    with torch.no_grad():
        nan.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    nan.save_pretrained(t / "nan")
    save_model(t / "nan-tok")  # a tokenizer beside the NaN weights
    for f in (t / "nan-tok").glob("tokenizer*"):
        f.rename(t / "nan" / f.name)
    (t / "harmful.json").write_text(json.dumps(HARMFUL_ROWS))
    (t / "data.xml").write_text("<rows/>")
    (t / "wrong_fields.json").write_text(json.dumps([{"foo": 1, "bar": 2}]))
    (t / "empty.json").write_text("[]")
    (t / "not-a-model").mkdir()
    (t / "full-out").mkdir()
    (t / "full-out" / "keep.txt").write_text("keep")
    return t


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, bad_input_dir, capsys):
    args = BAD_INPUTS[case](bad_input_dir)
    if "--ratio" not in args:
        args += ["--ratio", "0.1"]
    if "--out" not in args:
        args += ["--out", bad_input_dir / "never"]
    before = snapshot(bad_input_dir)
    assert main(["realign", "--quiet", *map(str, args)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("antidote: error: "), errors
    assert snapshot(bad_input_dir) == before


def test_apply_mask_bad_inputs(bad_input_dir, capsys):
    t = bad_input_dir
    assert main(["apply-mask", "--model", str(t / "base"), "--mask", str(t / "none.safetensors"), "--out", str(t / "never")]) == 2
    (t / "bad_mask.safetensors").write_bytes(b"not a safetensors file")
    assert main(["apply-mask", "--model", str(t / "base"), "--mask", str(t / "bad_mask.safetensors"), "--out", str(t / "never")]) == 2
    assert not (t / "never").exists()
