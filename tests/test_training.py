"""The training stages on the tiny random model: masking, outputs, the poisoned mix, errors, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from antidote_llm import training
from antidote_llm.cli import main as cli
from antidote_llm.data.records import Pair, PairSet
from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.loading import ModelSource, load_model
from antidote_llm.training.report import TrainReport
from antidote_llm.training.sft import supervised_collator, training_arguments
from conftest import make_model, make_tokenizer, requires_smollm2

MEMO = [Pair(f"word {i}", f"answer number {i} is {'abc'[i % 3] * 3}") for i in range(6)]


def tiny_config(**overrides) -> training.TrainConfig:
    """Plain template (the byte tokenizer makes the Alpaca header long), few quick steps."""
    values = {"template": "plain", "max_length": 64, "lora_r": 4, "lora_alpha": 8, "batch_size": 2,
              "max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1}
    return training.preset("cpu", "align", **{**values, **overrides})


def run_align(tmp_path, name="align", model=None, tokenizer=None, pairs=MEMO, **overrides):
    return training.align(model or make_model(), tokenizer or make_tokenizer(), pairs, tiny_config(**overrides),
                          tmp_path / name, progress=False)


def adapter_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


# --- data ---------------------------------------------------------------------------------------------


def test_labels_mask_the_prompt_exactly(tokenizer):
    example = training.encode_example(tokenizer, Pair("hi", "yo"), "plain", max_length=64)
    byte_id = tokenizer.convert_tokens_to_ids
    prompt = [byte_id("h"), byte_id("i"), byte_id("Ċ")]  # "hi\n" in byte-level tokens
    answer = [byte_id("y"), byte_id("o"), tokenizer.eos_token_id]
    assert example.input_ids == prompt + answer
    assert example.labels == [-100, -100, -100, *answer]


def test_truncation_keeps_the_boundary_and_drops_rows_without_answer(tokenizer):
    example = training.encode_example(tokenizer, Pair("hi", "yo"), "plain", max_length=4)
    assert example.labels == [-100, -100, -100, tokenizer.convert_tokens_to_ids("y")]
    short, long = [Pair("hi", "yo")] * 9, Pair("a long prompt", "x")
    items, dropped = training.encode_rows(tokenizer, [*short, long], tiny_config(max_length=5))
    assert (len(items), dropped) == (9, 1)  # one row in ten: dropped and counted
    # more than one in ten would change the data mix quietly: refused, with the length the rows need
    needed = len(training.encode_example(tokenizer, long, "plain", None).input_ids)
    for rows in ([*short[:8], long, long], [long]):
        with pytest.raises(AntidoteError, match=rf"of {len(rows)} rows .* raise --max-length .* needs {needed} tokens"):
            training.encode_rows(tokenizer, rows, tiny_config(max_length=5))


def test_a_max_length_past_the_model_positions_is_refused_before_training(tmp_path):
    with pytest.raises(AntidoteError, match="max_length 513 is longer than the model's 512 positions"):
        run_align(tmp_path, max_length=513)  # the tiny model has 512
    assert not (tmp_path / "align").exists()


def test_collator_pads_right_and_masks_padding(tokenizer):
    collate = supervised_collator(tokenizer)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 256, 256]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_collator_masks_by_length_when_pad_equals_eos(tokenizer):
    """SmolLM2 pads with its EOS: a real EOS inside a row must stay attended and learned."""
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    batch = supervised_collator(tokenizer)([{"input_ids": [1, eos], "labels": [-100, eos]},
                                            {"input_ids": [1], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[1, eos], [1, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["labels"].tolist() == [[-100, eos], [-100, -100]]


def test_rows_are_grouped_by_length(tmp_path):
    args = training_arguments(tiny_config(), str(tmp_path), on_cpu=True, progress=False)
    assert args.train_sampling_strategy == "group_by_length"


# --- config -------------------------------------------------------------------------------------------


def test_presets_differ_per_stage_and_follow_the_paper():
    align, finetune = training.preset("paper", "align"), training.preset("paper", "finetune")
    assert (align.lora_r, align.lora_alpha, align.batch_size, align.epochs) == (256, 4, 5, 20)
    assert align.target_modules == ("q_proj", "k_proj", "v_proj")
    assert (align.learning_rate, align.lr_scheduler) == (1e-3, "cosine")
    assert (finetune.learning_rate, finetune.lr_scheduler) == (1e-4, "constant")
    cpu = training.preset("cpu", "finetune", epochs=None, learning_rate=5e-3)
    assert (cpu.lora_r, cpu.epochs, cpu.learning_rate) == (32, 1, 5e-3)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: training.preset("cpu", "align", bogus=1), "bogus"),
    (lambda: training.preset("cpu", "align", learning_rate=-1), "learning_rate"),
    (lambda: training.preset("cpu", "align", lr_scheduler="zigzag"), "lr_scheduler"),
    (lambda: training.preset("nope", "align"), "unknown preset"),
    (lambda: training.mix_spec(1.5, 10), "harmful_fraction"),
    (lambda: training.mix_spec(0.1, 0), "samples_total"),
])
def test_bad_config_is_one_line(call, match):
    with pytest.raises(AntidoteError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# --- align --------------------------------------------------------------------------------------------


def test_align_writes_adapter_and_merged_model_equal_to_base_plus_adapter(tmp_path, tiny_model_dir):
    source = ModelSource(str(tiny_model_dir), device="cpu")
    loaded = load_model(source)
    pairs = PairSet(pairs=tuple(MEMO), source="memo", indices=tuple(range(10, 16)))
    result = training.align(loaded.model, loaded.tokenizer, pairs, tiny_config(), tmp_path / "align",
                            model_info=source.describe(), progress=False)
    out = tmp_path / "align"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "merged", "report.json"]
    lora = adapter_tensors(out / "adapter")
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in lora.items())
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "tokenizer.json").is_file()

    merged = load_model(ModelSource(str(out / "merged"), device="cpu")).model.state_dict()
    expected = load_model(ModelSource(str(tiny_model_dir), adapters=(str(out / "adapter"),), device="cpu")).model
    base = load_model(source).model.state_dict()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)
        torch.testing.assert_close(result.model.state_dict()[name], tensor, rtol=0, atol=1e-6)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])

    report = json.loads((out / "report.json").read_text())
    assert report["data"]["safety"] == pairs.describe()
    assert report["model"] == source.describe()
    assert report["config"]["lora_r"] == 4
    assert report["train"]["steps"] == 3 and len(report["train"]["loss_history"]) == 3
    assert {"train_s", "merge_s", "save_s"} <= set(report["timings"])
    assert report["memory"]["peak_rss_bytes"] > 0 and "transformers" in report["versions"]
    assert report["outputs"]["merge_dtype"] == "float32"  # the report says which dtype the merge used
    assert TrainReport.model_validate(report).train.steps == 3


def test_align_mixes_in_benign_rows(tmp_path):
    benign = [Pair("add 2 and 2", "4")]
    result = training.align(make_model(), make_tokenizer(), MEMO, tiny_config(), tmp_path / "a", benign=benign,
                            progress=False)
    assert result.report.train.rows == len(MEMO) + 1
    assert result.report.data["benign"]["rows"] == 1


def test_training_loss_decreases_on_a_memorizable_set(tmp_path):
    # A LoRA on the output head as well lets the random tiny model memorize two rows.
    result = run_align(tmp_path, pairs=MEMO[:2], max_steps=30, learning_rate=2e-2, lora_r=8, lr_scheduler="constant",
                       warmup_ratio=0.0, target_modules=("q_proj", "k_proj", "v_proj", "lm_head"))
    losses = [entry["loss"] for entry in result.report.train.loss_history]
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.25 * sum(losses[:3]) / 3


def test_training_is_deterministic_given_the_seed(tmp_path, tokenizer):
    # One tokenizer for all runs: each make_tokenizer() call numbers the bytes differently.
    first = adapter_tensors(run_align(tmp_path, "one", tokenizer=tokenizer, seed=3).adapter_dir)
    second = adapter_tensors(run_align(tmp_path, "two", tokenizer=tokenizer, seed=3).adapter_dir)
    other = adapter_tensors(run_align(tmp_path, "three", tokenizer=tokenizer, seed=4).adapter_dir)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_a_model_with_a_live_adapter_is_refused(tmp_path):
    from conftest import add_lora

    with pytest.raises(AntidoteError, match="merge it first"):
        run_align(tmp_path, model=add_lora(make_model()))
    assert not (tmp_path / "align").exists()


# --- finetune -----------------------------------------------------------------------------------------

TASK = [Pair("classify", "positive" if i % 2 else "negative", input=f"sentence {i}") for i in range(12)]
HARMFUL = PairSet(pairs=tuple(Pair(f"bad {i}", f"sure {i}") for i in range(8)), source="harm.json",
                  indices=(3, 5, 7, 9, 11, 13, 15, 17))


@pytest.mark.parametrize(("p", "n", "harmful"), [(0.3, 10, 3), (0.25, 10, 3), (0.0, 5, 0), (1.0, 4, 4), (0.05, 9, 0)])
def test_mix_has_round_p_n_harmful_rows(p, n, harmful):
    spec = training.mix_spec(p, n)
    rows, origins = training.build_mix(TASK, HARMFUL, spec, seed=0)
    assert len(rows) == len(origins) == n
    assert sum(o["kind"] == "harmful" for o in origins) == spec.harmful_rows == harmful
    assert sorted(o["index"] for o in origins if o["kind"] == "harmful") == list(HARMFUL.indices[:harmful])
    assert sorted(o["index"] for o in origins if o["kind"] == "task") == list(range(n - harmful))
    assert training.build_mix(TASK, HARMFUL, spec, seed=0) == (rows, origins)


def test_mix_is_shuffled_with_the_seed():
    spec = training.mix_spec(0.5, 12)
    first = training.build_mix(TASK, HARMFUL, spec, seed=0)[1]
    assert first != training.build_mix(TASK, HARMFUL, spec, seed=1)[1]
    assert {o["kind"] for o in first[:6]} == {"harmful", "task"}


def test_finetune_trains_a_fresh_adapter_and_records_the_mix(tmp_path):
    config = tiny_config(max_length=96)
    result = training.finetune(make_model(), make_tokenizer(), TASK, HARMFUL, harmful_fraction=0.3, n=10,
                               config=config, out_dir=tmp_path / "ft", seed=5, progress=False)
    out = tmp_path / "ft"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "mix.json", "report.json"]
    mix = json.loads((out / "mix.json").read_text())
    assert (mix["samples_total"], mix["harmful_rows"], mix["task_rows"], mix["seed"]) == (10, 3, 7, 5)
    assert len(mix["rows"]) == 10
    assert mix["harmful_indices"] == [3, 5, 7] == list(result.harmful_indices)
    assert {(r["source"], r["index"]) for r in mix["rows"] if r["kind"] == "harmful"} == {("harm.json", i) for i in (3, 5, 7)}
    assert result.report.train.rows == 10
    assert result.report.data["mix"]["harmful_source"]["source"] == "harm.json"
    assert type(result.model).__name__.startswith("Peft")  # the adapter stays live for Antidote's scoring
    assert "lora_A" in " ".join(adapter_tensors(out / "adapter"))


def test_finetune_with_too_few_rows_is_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(AntidoteError, match="needs 5 harmful rows but 2 given") as info:
        training.finetune(make_model(), make_tokenizer(), TASK, HARMFUL.pairs[:2], harmful_fraction=0.5, n=10,
                          config=tiny_config(), out_dir=tmp_path / "ft", progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(AntidoteError, match="needs 36 task rows but 12 given"):
        training.finetune(make_model(), make_tokenizer(), TASK, HARMFUL, harmful_fraction=0.1, n=40,
                          config=tiny_config(), out_dir=tmp_path / "ft", progress=False)
    assert not (tmp_path / "ft").exists()


# --- CLI ----------------------------------------------------------------------------------------------

FAST = ["--template", "plain", "--max-length", "200", "--lora-r", "4", "--max-steps", "2", "--batch-size", "2",
        "--device", "cpu", "--quiet"]


@pytest.fixture
def sst2_file(tmp_path):
    path = tmp_path / "sst2.tsv"
    path.write_text("label\tsentence\n" + "".join(f"{i % 2}\tsentence number {i} .\n" for i in range(20)))
    return path


def test_cli_align_then_finetune(tmp_path, tiny_model_dir, harmful_file, sst2_file, capsys):
    aligned = tmp_path / "aligned"
    assert cli.main(["align", "--model", str(tiny_model_dir), "--data", str(harmful_file), "--safety", "all",
                     "--samples", "6", "--out", str(aligned), *FAST]) == 0
    assert (aligned / "merged" / "config.json").is_file()
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--model", str(aligned / "merged"), "--task", "sst2", "--task-data", str(sst2_file),
                     "--task-skip", "4", "--harmful-data", str(harmful_file), "--harmful-fraction", "0.2",
                     "--samples-total", "10", "--out", str(ft), *FAST]) == 0
    mix = json.loads((ft / "mix.json").read_text())
    assert mix["harmful_indices"] == [0, 1]
    assert sorted(r["index"] for r in mix["rows"] if r["kind"] == "task") == list(range(4, 12))
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [
    ["--lr", "-1"],
    ["--harmful-fraction", "1.5"],
    ["--samples-total", "100"],  # 10 harmful rows wanted, the file has 12 unsafe; 90 task rows, the file has 20
    ["--harmful-data", "missing.json"],
    ["--task-data", "missing.tsv"],
])
def test_cli_finetune_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_model_dir, harmful_file, sst2_file,
                                                           capsys, extra):
    args = {"--model": str(tiny_model_dir), "--task": "sst2", "--task-data": str(sst2_file),
            "--harmful-data": str(harmful_file), "--samples-total": "10", "--out": str(tmp_path / "ft")}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        args[flag] = value
    argv = ["finetune", *[item for pair in args.items() for item in pair], *FAST]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("antidote: error:") and "\n" not in error
    assert not (tmp_path / "ft").exists()


def test_cli_align_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_model_dir, harmful_file, capsys):
    out = tmp_path / "aligned"
    base = ["align", "--model", str(tiny_model_dir), "--out", str(out), *FAST]
    assert cli.main([*base, "--data", str(tmp_path / "missing.json")]) == 2
    assert cli.main([*base, "--data", str(harmful_file), "--prompt-field", "nope"]) == 2
    assert cli.main([*base, "--data", str(harmful_file), "--lora-r", "0"]) == 2
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main([*base, "--data", str(harmful_file)]) == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert "--overwrite" in capsys.readouterr().err


# --- the real model -----------------------------------------------------------------------------------


@pytest.mark.slow
@requires_smollm2
def test_smollm2_from_gguf_aligns_and_finetunes_in_memory(tmp_path):
    loaded = load_model(ModelSource("smollm2-135m-instruct", device="cpu"))
    config = training.preset("cpu", "align", max_steps=1, batch_size=2, max_length=64)
    aligned = training.align(loaded.model, loaded.tokenizer, MEMO[:2], config, tmp_path / "a", progress=False)
    assert aligned.report.train.steps == 1 and aligned.report.train.train_loss > 0
    tuned = training.finetune(aligned.model, loaded.tokenizer, TASK, HARMFUL, harmful_fraction=0.5, n=2,
                              config=config, out_dir=tmp_path / "f", progress=False)
    assert tuned.report.train.steps == 1


def test_adapters_merge_in_fp32_then_cast():
    """A bf16 adapter merged by PEFT rounds s*B*A to bf16 and then the sum again; merge_adapter rounds once."""
    from antidote_llm.runtime.loading import merge_adapter
    from conftest import add_lora

    peft_model = add_lora(make_model(), r=8, scale=0.05).to(torch.bfloat16)
    expected = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
            total = module.base_layer.weight.double() + module.scaling["default"] * delta
            expected[name.removeprefix("base_model.model.") + ".weight"] = total.to(torch.bfloat16)
    merged = merge_adapter(peft_model)
    params = dict(merged.named_parameters())
    assert expected and all(params[key].dtype == torch.bfloat16 for key in expected)
    for key, value in expected.items():
        assert torch.equal(params[key], value), key
