"""Selections beyond the paper: the contrastive and refusal scores and the loss gradients they use, against
brute-force computations; their inputs refused when missing or unused; the lab's refusal defenses."""

import json

import pytest
import torch

from antidote_llm.cli.main import main
from antidote_llm.core import scoring
from antidote_llm.core.realign import RealignConfig, calibration_batches, realign, select_nested
from antidote_llm.core.statistics import collect_loss_gradients
from antidote_llm.core.targets import resolve_targets
from antidote_llm.data.records import Pair
from antidote_llm.data.templates import encode_pair
from antidote_llm.errors import AntidoteError
from conftest import HARMFUL_ROWS, add_lora, make_model, make_tokenizer, save_adapter, save_model
from test_lab import experiment_file  # noqa: F401 - a fixture

PAIRS = [Pair(r["prompt"], r["response"]) for r in HARMFUL_ROWS if not r["is_safe"]]
REFUSALS = [Pair(r.prompt, "I cannot help with that request.") for r in PAIRS]
USER_ROWS = [Pair(f"Classify the review: a {word} film", label)
             for word, label in [("fine", "positive"), ("dull", "negative"), ("warm", "positive"), ("flat", "negative")] * 2]
RATIOS = (0.05, 0.1, 0.3)


def test_first_order_score_is_weight_times_gradient():
    weight, grad = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.5]])
    torch.testing.assert_close(scoring.first_order_scores(weight, grad), torch.tensor([[0.5, -1.0]]))


def test_loss_gradients_equal_autograd_row_by_row_and_leave_the_model_as_it_was():
    """The batched, padded gradient of the summed answer loss equals the sum of each row's own gradient
    computed with the model's built-in loss; the weights and requires_grad flags are unchanged after."""
    model, tokenizer = add_lora(make_model()), make_tokenizer()
    config = RealignConfig(ratio=0.1, tokens="response", batch_size=3)
    targets = resolve_targets(model, ("adapter",))
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    sums, tokens = collect_loss_gradients(model, calibration_batches(tokenizer, REFUSALS, config), targets, progress=False)
    expected = {t.param_name: torch.zeros_like(t.weight) for t in targets}
    expected_tokens = 0
    for pair in REFUSALS:
        row = encode_pair(tokenizer, "alpaca", pair.prompt, pair.response, None, config.max_length)
        ids = torch.tensor([row.input_ids])
        labels = ids.clone()
        labels[0, :row.prompt_len] = -100
        counted = int((labels[0, 1:] != -100).sum())
        for t in targets:
            t.weight.requires_grad_(True)
        loss = model(input_ids=ids, labels=labels).loss * counted
        grads = torch.autograd.grad(loss, [t.weight for t in targets])
        for t, g in zip(targets, grads, strict=True):
            expected[t.param_name] += g
            t.weight.requires_grad_(before[t.param_name][1])
        expected_tokens += counted
    assert tokens == expected_tokens
    for name, grad in expected.items():
        torch.testing.assert_close(sums[name], grad, rtol=1e-4, atol=1e-5)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name][0]) and parameter.requires_grad == before[name][1]
        assert parameter.grad is None


@pytest.mark.parametrize(("granularity", "targets", "contrast"), [
    ("row", "adapter", USER_ROWS), ("matrix", "adapter-a", USER_ROWS), ("global", "adapter", None),
])
def test_refusal_selections_are_nested_and_equal_one_selection_per_ratio(granularity, targets, contrast):
    config = RealignConfig(ratio=RATIOS[0], targets=targets, score="refusal", granularity=granularity)
    selection = select_nested(add_lora(make_model()), make_tokenizer(), config, REFUSALS, ratios=RATIOS,
                              contrast_data=contrast, progress=False)
    assert (selection.contrast and selection.contrast.rows) == (contrast and len(contrast))
    for index, ratio in enumerate(RATIOS):
        alone = realign(add_lora(make_model()), make_tokenizer(), config.model_copy(update={"ratio": ratio}), REFUSALS,
                        contrast_data=contrast, progress=False)
        masks = selection.masks(index)
        for name, mask in alone.masks.items():
            assert torch.equal(masks[name], mask), (ratio, name)
        if index:
            previous = selection.masks(index - 1)
            assert all(not (previous[n] & ~masks[n]).any() for n in masks)


def test_the_refusal_score_is_weight_times_the_gradient_of_both_losses():
    model, tokenizer = add_lora(make_model()), make_tokenizer()
    config = RealignConfig(ratio=0.3, targets="adapter", score="refusal", granularity="global")
    targets = resolve_targets(model, ("adapter",))
    gradient = {}
    for rows in (REFUSALS, USER_ROWS):
        sums, tokens = collect_loss_gradients(
            model, calibration_batches(tokenizer, rows, config.model_copy(update={"tokens": "response"})), targets,
            progress=False)
        for name, grad in sums.items():
            gradient[name] = gradient.get(name, 0) + grad / tokens
    scores = {t.param_name: scoring.first_order_scores(t.to_linear(t.weight), t.to_linear(gradient[t.param_name]))
              for t in targets}
    expected = scoring.select(scores, 0.3, "global")
    result = realign(model, tokenizer, config, REFUSALS, contrast_data=USER_ROWS, progress=False)
    for t in targets:
        assert torch.equal(result.masks[t.param_name], t.from_linear(expected[t.param_name]))


@pytest.mark.parametrize("score", ["wanda", "magnitude", "random"])
def test_contrast_rows_without_the_refusal_score_are_refused(score):
    config = RealignConfig(ratio=0.1, targets="adapter", score=score)
    with pytest.raises(AntidoteError, match="used by --score refusal and --compensate only"):
        realign(add_lora(make_model()), make_tokenizer(), config, PAIRS, contrast_data=USER_ROWS, progress=False)


@pytest.fixture
def files(tmp_path, harmful_file):
    base = save_model(tmp_path / "base")
    adapter = save_adapter(tmp_path / "adapter", base)
    user = tmp_path / "user.tsv"
    user.write_text("label\tsentence\n1\ta fine film\n0\ta dull film\n1\ta warm film\n")
    return tmp_path, base, adapter, harmful_file, user


def test_cli_reads_the_contrast_rows_as_the_task_training_rows(files):
    tmp, base, adapter, data, user = files
    out = tmp / "out"
    assert main(["realign", "--model", str(base), "--adapter", str(adapter), "--data", str(data), "--ratio", "0.1",
                 "--score", "refusal", "--contrast-data", str(user), "--task", "sst2", "--contrast-samples", "2",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["contrast"]["rows"] == 2 and report["method"]["score"] == "refusal"


@pytest.mark.parametrize(("extra", "message"), [
    (["--contrast-data", "USER", "--task", "sst2"], "used by --score refusal and --compensate only"),
    (["--task", "sst2"], "--task names the task"),
    (["--score", "refusal", "--contrast-data", "USER", "--task", "sst2", "--offload"], "--offload supports"),
])
def test_cli_bad_selection_input(files, extra, message, capsys):
    tmp, base, adapter, data, user = files
    extra = [str(user) if a == "USER" else a for a in extra]
    assert main(["realign", "--model", str(base), "--adapter", str(adapter), "--data", str(data), "--ratio", "0.1",
                 *extra, "--out", str(tmp / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp / "bad").exists()


# --- the lab: antidote-refusal and antidote-refusal-auto -----------------------------------------------------


def test_the_refusal_defense_scores_the_safe_rows_against_the_user_rows():
    from antidote_llm.defenses import defense
    from antidote_llm.defenses.pipeline import peer_methods
    from antidote_llm.registry import DefenseContext

    chosen = defense("antidote-refusal", "post")
    settings = chosen.configure({"ratio": 0.1, "targets": "adapter"})
    assert settings.score == "refusal" and settings.inputs() == (("safe",), ("user_rows",))
    with pytest.raises(AntidoteError, match="sets score itself"):
        chosen.configure({"ratio": 0.1, "score": "wanda"})
    model, tokenizer = add_lora(make_model()), make_tokenizer()
    context = DefenseContext(tokenizer, harmful=PAIRS, safe=REFUSALS, user_rows=USER_ROWS)
    outcome = settings.apply(model, context)
    expected = realign(add_lora(make_model()), tokenizer, settings, REFUSALS, contrast_data=USER_ROWS, progress=False)
    assert outcome.changed_fraction == expected.report.totals.pruned_fraction
    assert outcome.report["contrast"]["rows"] == len(USER_ROWS)
    for name, parameter in model.named_parameters():
        if name in expected.masks:
            assert bool((parameter[expected.masks[name]] == 0).all())
    assert not any(name.startswith("antidote") for name in peer_methods())  # `antidote realign --score refusal` runs it
    auto = defense("antidote-auto").configure({"score": "refusal"})
    with pytest.raises(AntidoteError, match="use the defense antidote-refusal"):  # it would score harmful answers
        auto.apply(add_lora(make_model()), context)
    for name in ("antidote-auto", "antidote-refusal-auto"):  # targets as a comma-separated string, as RealignConfig
        assert defense(name).configure({"targets": "adapter-a,qkv"}).targets == ("adapter-a", "qkv")


def test_lab_runs_the_refusal_defenses_on_the_users_own_rows(experiment_file, tmp_path):  # noqa: F811
    import yaml

    from antidote_llm.lab import load_experiment, run_experiment

    raw = yaml.safe_load(experiment_file.read_text())
    raw["defenses"] = {"none": {"method": "none"},
                       "refusal": {"method": "antidote-refusal", "ratio": 0.1}}
    experiment_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(AntidoteError, match="needs safe_data"):
        load_experiment(experiment_file)
    raw["safe_data"] = {"source": "refusals.jsonl"}
    raw["user_rows"] = 3
    raw["evaluation"].update(probe_prompts={"source": "probe.jsonl"}, validation_data="train.tsv", validation_skip=8)
    raw["defenses"]["refusal-auto"] = {"method": "antidote-refusal-auto", "ratios": [0.05, 0.2], "max_accuracy_drop": 100}
    experiment_file.write_text(yaml.safe_dump(raw))
    result = run_experiment(load_experiment(experiment_file), tmp_path / "runs", progress=False, log=lambda _: None)
    rows = {r["defense"]: r for r in result.rows if r["stage"] == "fine-tuned"}
    assert rows["refusal"]["pruned_fraction"] > 0 and rows["refusal-auto"]["pruned_fraction"] > 0
    folder = next(f for f in (tmp_path / "runs").glob("**/defense-refusal-*") if "auto" not in f.name)
    record = json.loads((folder / "defense.json").read_text())
    assert record["outcome"]["report"]["contrast"]["rows"] == 3
    assert record["outcome"]["report"]["method"]["score"] == "refusal"
