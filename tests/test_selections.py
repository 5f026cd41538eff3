"""Selections beyond the paper: the contrastive and refusal scores, the gap allocation, and the loss gradients
they use, against brute-force computations; their inputs refused when missing or unused."""

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

PAIRS = [Pair(r["prompt"], r["response"]) for r in HARMFUL_ROWS if not r["is_safe"]]
REFUSALS = [Pair(r.prompt, "I cannot help with that request.") for r in PAIRS]
USER_ROWS = [Pair(f"Classify the review: a {word} film", label)
             for word, label in [("fine", "positive"), ("dull", "negative"), ("warm", "positive"), ("flat", "negative")] * 2]
RATIOS = (0.05, 0.1, 0.3)


def test_contrastive_score_is_wanda_minus_wanda_on_the_contrast_rows():
    weight = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    data, contrast = torch.tensor([4.0, 0.25]), torch.tensor([1.0, 1.0])
    expected = scoring.wanda_scores(weight, data) - scoring.wanda_scores(weight, contrast)
    torch.testing.assert_close(scoring.contrastive_scores(weight, data, contrast), expected)


def test_first_order_score_is_weight_times_gradient():
    weight, grad = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.5]])
    torch.testing.assert_close(scoring.first_order_scores(weight, grad), torch.tensor([[0.5, -1.0]]))


def test_wanda_gap_is_the_relative_excess_of_the_data_signal():
    torch.manual_seed(0)
    weight, data, contrast = torch.randn(5, 3), torch.rand(3) + 0.1, torch.rand(3) + 0.1
    mass = lambda ms: sum(abs(weight[i, j]) * ms[j].sqrt() for i in range(5) for j in range(3))  # noqa: E731
    expected = max(float(mass(data) / mass(contrast)) - 1, 0.0)
    assert scoring.wanda_gap(weight, data, contrast) == pytest.approx(expected, rel=1e-5)
    assert scoring.wanda_gap(weight, contrast, contrast) == 0.0


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.3])
def test_allocated_ratios_keep_the_budget_follow_the_weights_and_cap(ratio):
    sizes, weights = [100, 300, 50, 50], [1.0, 2.0, 0.0, 8.0]
    shares = scoring.allocate_ratios(ratio, sizes, weights, cap=0.5)
    assert sum(s * r for s, r in zip(sizes, shares, strict=True)) == pytest.approx(ratio * sum(sizes))
    assert shares[2] == 0 and all(0 <= r <= 0.5 for r in shares)
    free = [i for i in range(4) if weights[i] > 0 and shares[i] < 0.5]
    for i in free:  # the uncapped shares are proportional to the weights
        assert shares[i] / weights[i] == pytest.approx(shares[free[0]] / weights[free[0]])
    if ratio == 0.3:
        assert shares[3] == 0.5  # capped; what it could not take went to the others
    assert scoring.allocate_ratios(ratio, sizes, [0.0] * 4) == [ratio] * 4


def test_allocated_ratios_grow_with_the_ratio():
    sizes, weights = [100, 300, 50], [1.0, 3.0, 20.0]
    previous = [0.0] * 3
    for ratio in (0.01, 0.05, 0.1, 0.2, 0.4, 0.6):
        shares = scoring.allocate_ratios(ratio, sizes, weights)
        assert all(b >= a for a, b in zip(previous, shares, strict=True))
        previous = shares


def test_allocation_weights_must_be_non_negative():
    with pytest.raises(AntidoteError, match="non-negative"):
        scoring.allocate_ratios(0.1, [10, 10], [1.0, -1.0])


def test_a_zero_ratio_selects_nothing():
    assert not scoring.select_tensor(torch.rand(3, 4), 0.0, "row").any()


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
        torch.testing.assert_close(sums[name], grad, rtol=1e-4, atol=1e-6)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name][0]) and parameter.requires_grad == before[name][1]
        assert parameter.grad is None


@pytest.mark.parametrize(("update", "data"), [
    ({"score": "contrastive"}, PAIRS),
    ({"score": "refusal"}, REFUSALS),
    ({"allocation": "gap"}, PAIRS),
    ({"allocation": "gap", "granularity": "matrix", "score": "contrastive"}, PAIRS),
])
def test_new_selections_are_nested_and_equal_one_selection_per_ratio(update, data):
    config = RealignConfig(ratio=RATIOS[0], targets="adapter", **update)
    selection = select_nested(add_lora(make_model()), make_tokenizer(), config, data, ratios=RATIOS,
                              contrast_data=USER_ROWS, progress=False)
    assert selection.contrast.rows == len(USER_ROWS)
    for index, ratio in enumerate(RATIOS):
        alone = realign(add_lora(make_model()), make_tokenizer(), config.model_copy(update={"ratio": ratio}), data,
                        contrast_data=USER_ROWS, progress=False)
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


def test_the_gap_allocation_gives_each_tensor_its_share():
    model, tokenizer = add_lora(make_model()), make_tokenizer()
    config = RealignConfig(ratio=0.1, targets="adapter", allocation="gap", granularity="matrix")
    result = realign(model, tokenizer, config, PAIRS, contrast_data=USER_ROWS, progress=False)
    fractions = [m.pruned / m.scored for m in result.report.modules.values()]
    assert len(set(round(f, 3) for f in fractions)) > 1  # not uniform
    assert result.report.totals.pruned_fraction == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize(("update", "contrast", "message"), [
    ({"score": "contrastive"}, None, "needs contrast rows"),
    ({"allocation": "gap"}, None, "needs contrast rows"),
    ({}, USER_ROWS, "--contrast-data is used by"),
    ({"allocation": "gap", "granularity": "global"}, USER_ROWS, "row or matrix"),
    ({"allocation": "gap", "score": "refusal"}, USER_ROWS, "--score wanda or contrastive"),
])
def test_missing_or_unused_contrast_rows_are_refused(update, contrast, message):
    config = RealignConfig(ratio=0.1, targets="adapter", **update)
    with pytest.raises(AntidoteError, match=message):
        realign(add_lora(make_model()), make_tokenizer(), config, PAIRS, contrast_data=contrast, progress=False)


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
                 "--score", "contrastive", "--contrast-data", str(user), "--task", "sst2", "--contrast-samples", "2",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["contrast"]["rows"] == 2 and report["method"]["score"] == "contrastive"


@pytest.mark.parametrize(("extra", "message"), [
    (["--score", "contrastive"], "needs contrast rows"),
    (["--contrast-data", "USER"], "--contrast-data is used by"),
    (["--task", "sst2"], "--task names the task"),
    (["--score", "contrastive", "--contrast-data", "USER", "--task", "sst2", "--offload"], "--offload supports"),
])
def test_cli_bad_selection_input(files, extra, message, capsys):
    tmp, base, adapter, data, user = files
    extra = [str(user) if a == "USER" else a for a in extra]
    assert main(["realign", "--model", str(base), "--adapter", str(adapter), "--data", str(data), "--ratio", "0.1",
                 *extra, "--out", str(tmp / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp / "bad").exists()
