"""GuardCallback on the real transformers Trainer (and TRL's SFTTrainer when it is installed): a few steps of LoRA
training on the tiny model, then guard on the trained adapter, the verdict beside the checkpoints.

As in test_guard, the probe evaluation answers by how much of lora_A is zero, so each verdict is known; the
training, the saving, the loading, the scoring, the search and the writing are the real ones."""

from __future__ import annotations

import json

import pytest

from antidote_llm.errors import AntidoteError
from antidote_llm.integrations import GuardCallback, GuardRejected
from conftest import make_tokenizer
from test_guard import behaviour, lineage, zeroed_share  # noqa: F401 - fixtures

ROWS = [f"Review: film number {i} was good. Sentiment: positive" for i in range(8)]


def _callback(lineage, **extra) -> GuardCallback:  # noqa: F811
    inputs = {"probe_prompts": str(lineage / "probe.jsonl"), "task": "sst2", "data": str(lineage / "calibration.jsonl"),
              "validation_data": str(lineage / "validation.tsv"), "score": "wanda", "compensate": False,
              "template": "plain"}
    return GuardCallback(**{**inputs, **extra})


def _lora_model(lineage):  # noqa: F811
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(lineage / "aligned")  # the adapter names this folder as its base
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))


def _trainer(lineage, output_dir, callback, trainer_class=None):  # noqa: F811
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = make_tokenizer()
    items = [{"input_ids": tokenizer(text)["input_ids"]} for text in ROWS]
    args = TrainingArguments(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True)
    return (trainer_class or Trainer)(model=_lora_model(lineage), args=args, train_dataset=items,
                                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                                      processing_class=tokenizer, callbacks=[callback])


def test_a_callback_without_probe_prompts_or_with_bad_inputs_fails_at_construction(lineage, capsys):  # noqa: F811
    with pytest.raises(AntidoteError) as error:
        GuardCallback(task="sst2", validation_data=str(lineage / "validation.tsv"))
    assert "\n" not in str(error.value) and "give probe_prompts=" in str(error.value)
    with pytest.raises(AntidoteError, match="contrast_data="):  # the default score, refusal, needs the user's rows
        GuardCallback(probe_prompts=str(lineage / "probe.jsonl"), task="sst2",
                      validation_data=str(lineage / "validation.tsv"), data=str(lineage / "calibration.jsonl"))
    with pytest.raises(AntidoteError, match="max_harmful"):
        _callback(lineage, max_harmful=150)
    with pytest.raises(AntidoteError, match="no field 'SemanticCategory'.*fields found: prompt"):
        from antidote_llm.data.spec import DataSpec

        _callback(lineage, probe_prompts=DataSpec(source=str(lineage / "probe.jsonl"), category_field="SemanticCategory"))


def test_the_trainer_ends_with_guards_verdict_beside_its_checkpoints(behaviour, lineage):  # noqa: F811
    behaviour(safe_from=zeroed_share(0.05))
    callback = _callback(lineage)
    trainer = _trainer(lineage, lineage / "run", callback)
    trainer.train()
    assert trainer.state.global_step == 3
    verdict = json.loads((lineage / "run" / "guard" / "verdict.json").read_text())
    assert verdict["verdict"] == "repaired" == callback.report.verdict and verdict["ratio"] == 0.05
    trained = lineage / "run" / "guard-input" / "adapter"
    assert verdict["model"]["model"] == str(lineage / "aligned") and verdict["model"]["adapters"] == [str(trained)]
    # guard read what training made (lora_B left zero), and left the trainer's model as it was
    from safetensors.torch import load_file

    saved = load_file(str(trained / "adapter_model.safetensors"))
    assert any(float(t.abs().max()) > 0 for name, t in saved.items() if "lora_B" in name)
    live = {n: p for n, p in trainer.model.named_parameters() if "lora_A" in n}
    assert live and all(int((p == 0).sum()) == 0 for p in live.values())
    repaired = lineage / "run" / "guard" / "adapter"
    assert (repaired / "adapter_model.safetensors").is_file() and (repaired / "README.md").is_file()
    pruned = load_file(str(repaired / "adapter_model.safetensors"))
    assert any(int((t == 0).sum()) for name, t in pruned.items() if "lora_A" in name)


def test_fail_on_rejected_raises_after_writing_the_verdict(behaviour, lineage):  # noqa: F811
    behaviour(safe_from=1.1)  # no ratio repairs it
    trainer = _trainer(lineage, lineage / "run", _callback(lineage, fail_on_rejected=True))
    with pytest.raises(GuardRejected, match="guard rejected the trained model: no ratio") as error:
        trainer.train()
    assert "\n" not in str(error.value)
    assert json.loads((lineage / "run" / "guard" / "verdict.json").read_text())["verdict"] == "rejected"
    behaviour(safe_from=1.1)
    _trainer(lineage, lineage / "quiet", _callback(lineage)).train()  # without it, a rejection is only reported
    assert (lineage / "quiet" / "guard" / "verdict.md").read_text().startswith("# Guard verdict: rejected")


def test_an_occupied_verdict_folder_stops_the_run_before_training(behaviour, lineage):  # noqa: F811
    fake = behaviour(safe_from=0.0)
    (lineage / "run" / "guard").mkdir(parents=True)
    (lineage / "run" / "guard" / "keep.txt").write_text("mine")
    trainer = _trainer(lineage, lineage / "run", _callback(lineage))
    with pytest.raises(AntidoteError, match="not empty"):
        trainer.train()
    assert trainer.state.global_step == 0 and fake.calls == []
    assert not (lineage / "run" / "guard-input").exists()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL's own default
def test_under_trls_sft_trainer(behaviour, lineage):  # noqa: F811
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    behaviour(safe_from=zeroed_share(0.05))
    tokenizer = make_tokenizer()
    args = SFTConfig(output_dir=str(lineage / "trl"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, max_length=64)
    data = Dataset.from_list([{"prompt": f"Review: film {i} was good. Sentiment:", "completion": " positive"}
                              for i in range(8)])
    trainer = SFTTrainer(model=_lora_model(lineage), args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[_callback(lineage)])
    trainer.train()
    verdict = json.loads((lineage / "trl" / "guard" / "verdict.json").read_text())
    assert verdict["verdict"] == "repaired" and verdict["model"]["adapters"] == [
        str(lineage / "trl" / "guard-input" / "adapter")]
