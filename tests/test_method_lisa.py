"""Lisa on the tiny random model: the K_a / K_f schedule, guide rows in the alignment steps, the proximal
gradient rho (w - w_entry) checked against hand-computed gradients, no proximal term in the first 10 % of steps."""

from __future__ import annotations

import json

import pytest
import torch

from antidote_llm import training
from antidote_llm.data.records import Pair, PairSet
from antidote_llm.errors import AntidoteError
from antidote_llm.training.methods import MethodRun
from antidote_llm.training.methods.lisa import Lisa
from conftest import make_model, make_tokenizer, saved_lora_b

MARK = "#"  # in every guide answer and in no user row, so a batch tells where it came from
USER = [Pair(f"task {i}", "positive" if i % 2 else "negative", input=f"sentence {i}") for i in range(12)]
GUIDE = PairSet(pairs=tuple(Pair(f"harmful request {i}", f"I cannot help with that {MARK}") for i in range(9)),
                source="guide.json", indices=tuple(range(9)))
ALIGN_STEPS, FINETUNE_STEPS, STEPS, RHO = 3, 4, 20, 1.0


def tiny_config(**overrides) -> training.TrainConfig:
    values = {"template": "plain", "max_length": 64, "lora_r": 4, "lora_alpha": 8, "batch_size": 2,
              "max_steps": STEPS, "learning_rate": 1e-2, "logging_steps": 1}
    return training.preset("cpu", "finetune", **{**values, **overrides})


def run_finetune(out_dir, method: MethodRun, **config):
    return training.finetune(make_model(), make_tokenizer(), USER, None, harmful_fraction=0.0, n=10,
                             config=tiny_config(**config), out_dir=out_dir, method=method, progress=False)


def recording_trainer(records: list[dict]):
    """Lisa's trainer that records, per optimizer step, the weights it starts from, the batch it trains on and
    the gradient it leaves (read before the Trainer clips it)."""

    class Recording(Lisa.trainer()):
        def training_step(self, model, inputs, num_items_in_batch=None):
            records.append({"step": self.state.global_step,
                            "weights": [p.detach().clone() for p in self.trainable_parameters()]})
            loss = super().training_step(model, inputs, num_items_in_batch)
            records[-1]["grads"] = [p.grad.detach().clone() for p in self.trainable_parameters()]
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            records[-1]["batch"] = {key: value.detach().clone() for key, value in inputs.items()}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return Recording


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    records: list[dict] = []
    class RecordingLisa(Lisa):
        @classmethod
        def trainer(cls) -> type:
            return recording_trainer(records)

    settings = RecordingLisa.configure(dict(rho=RHO, align_steps=ALIGN_STEPS, finetune_steps=FINETUNE_STEPS), preset="cpu")
    result = run_finetune(tmp_path_factory.mktemp("lisa") / "ft", MethodRun(settings, {"defense_guide": GUIDE}))
    return records, result.model


def is_guide_batch(batch) -> bool:
    mark = make_tokenizer().convert_tokens_to_ids(MARK)
    rows_marked = (batch["input_ids"] == mark).any(dim=1)
    assert rows_marked.all() or not rows_marked.any()  # never a mix of guide and user rows
    return bool(rows_marked.all())


def test_states_alternate_every_k_a_then_k_f_optimizer_steps_on_guide_then_user_rows(recorded):
    records, _ = recorded
    assert [r["step"] for r in records] == list(range(STEPS))
    schedule = "".join("A" if is_guide_batch(r["batch"]) else "F" for r in records)
    assert schedule == "AAAFFFFAAAFFFFAAAFFF"


def hand_gradients(model, weights, batch) -> list[torch.Tensor]:
    """The cross-entropy gradient alone, at `weights`, by a plain forward and backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for param, value in zip(params, weights, strict=True):
            param.copy_(value)
    model.train()
    loss = model(**batch).loss
    return list(torch.autograd.grad(loss, params))


def test_proximal_gradient_is_rho_times_distance_to_the_entry_weights_after_the_first_tenth(recorded):
    records, model = recorded
    entry = None
    for index, record in enumerate(records):
        if index == 0 or is_guide_batch(record["batch"]) != is_guide_batch(records[index - 1]["batch"]):
            entry = record["weights"]  # the weights when this state was entered
        cross_entropy = hand_gradients(model, record["weights"], record["batch"])
        proximal = [g - ce for g, ce in zip(record["grads"], cross_entropy, strict=True)]
        if record["step"] > 0.1 * STEPS:
            expected = [RHO * (w - a) for w, a in zip(record["weights"], entry, strict=True)]
        else:
            expected = [torch.zeros_like(w) for w in record["weights"]]
        for got, want in zip(proximal, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # Not vacuous: step 2 (no term) had moved from its anchor, step 19 felt a real pull toward step 17's weights.
    assert largest_gap(records[2]["weights"], records[0]["weights"]) > 1e-3
    assert RHO * largest_gap(records[19]["weights"], records[17]["weights"]) > 1e-3


def largest_gap(weights, others) -> float:
    return max(float((w - o).abs().max()) for w, o in zip(weights, others, strict=True))


def test_presets_and_bounds():
    assert Lisa.configure({}, preset="paper").model_dump() == {"rho": 1.0, "align_steps": 100, "finetune_steps": 900}
    cpu = Lisa.configure({}, preset="cpu")
    assert cpu.align_steps / (cpu.align_steps + cpu.finetune_steps) == pytest.approx(0.1)
    assert cpu.inputs() == (("defense_guide",),) and Lisa.single_accumulation
    with pytest.raises(AntidoteError, match="finetune_steps"):
        Lisa.configure(dict(finetune_steps=0), preset="cpu")


def test_finetune_with_guide_rows_writes_a_loadable_adapter_and_names_the_defense(tmp_path):
    settings = Lisa.configure(dict(align_steps=1, finetune_steps=2), preset="cpu")
    result = run_finetune(tmp_path / "ft", MethodRun(settings, {"defense_guide": GUIDE}), max_steps=4)
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["defense"]["name"] == "lisa"
    assert report["defense"]["settings"] == {"rho": 1.0, "align_steps": 1, "finetune_steps": 2}
    assert report["defense"]["data"]["defense_guide"]["source"] == "guide.json"
    assert report["train"]["steps"] == 4
    trained = dict(result.model.named_parameters())
    for name, param in saved_lora_b(tmp_path / "ft" / "adapter").items():
        torch.testing.assert_close(param, trained[name])


def test_without_guide_rows_it_is_refused_before_training(tmp_path):
    with pytest.raises(AntidoteError, match="needs --guide-data"):
        run_finetune(tmp_path / "ft", MethodRun(Lisa.configure({}, preset="cpu")))
    assert not (tmp_path / "ft").exists()


@pytest.mark.slow
def test_cli_lisa_on_two_cpu_processes_trains_the_one_process_adapter(tmp_path):
    """`antidote finetune --defense lisa` under `accelerate launch` (2 CPU processes, gloo): guide batches are
    sharded like the user's and normalised over the global batch, so 2 x 2 rows make the 1 x 4 run's steps."""
    from safetensors.torch import load_file

    from conftest import save_model
    from test_distributed import _free_port, _run

    model_dir = save_model(tmp_path / "model")
    (tmp_path / "sst2.tsv").write_text("label\tsentence\n" + "".join(
        f"{i % 2}\tsentence number {i}{' and more' * (i % 4)} .\n" for i in range(40)))
    (tmp_path / "guide.json").write_text(json.dumps([
        {"prompt": f"Harmful request {i}?" + " really" * (i % 3), "response": "I cannot help with that." + " No." * (i % 4),
         "is_safe": True} for i in range(24)]))
    # Six steps of cycles 2 + 2: alignment, fine-tuning, alignment; the proximal term from step 1 on.
    common = ["finetune", "--model", str(model_dir), "--device", "cpu", "--task", "sst2",
              "--task-data", str(tmp_path / "sst2.tsv"), "--harmful-fraction", "0", "--samples-total", "32",
              "--defense", "lisa", "--guide-data", str(tmp_path / "guide.json"),
              "--defense-option", "align_steps=2", "--defense-option", "finetune_steps=2",
              "--preset", "cpu", "--template", "plain", "--max-length", "256", "--max-steps", "6", "--lr", "1e-2",
              "--quiet"]
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    two = _run(launch, [*common, "--batch-size", "2", "--out", str(tmp_path / "two")], tmp_path)
    _run([], [*common, "--batch-size", "4", "--out", str(tmp_path / "one")], tmp_path)

    assert two.stdout.count("antidote: finetune:") == 1  # only the main process reports and writes
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["defense"]["name"] == "lisa" and report["defense"]["settings"]["align_steps"] == 2
    assert (report["train"]["steps"], report["train"]["rows"]) == (6, 32)
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    two_adapter = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two_adapter.keys()
    assert max(float(t.abs().max()) for k, t in one.items() if "lora_B" in k) > 1e-3
    for key in one:  # a different batch would move weights by ~lr
        torch.testing.assert_close(two_adapter[key], one[key], rtol=1e-4, atol=1e-5)
