"""Beyond the paper, issue 19: prune then compensate (a least-squares re-fit of the kept weights on the user's
rows, anchored on the calibration rows), against brute-force computations; their inputs refused when missing."""

import json

import pytest
import torch

from antidote_llm.cli.main import main
from antidote_llm.core import scoring
from antidote_llm.core.realign import (
    RealignConfig,
    calibration_batches,
    realign,
    select_nested,
)
from antidote_llm.core.statistics import collect_grams
from antidote_llm.core.targets import resolve_targets
from antidote_llm.errors import AntidoteError
from antidote_llm.frontier.search import NestedPruning
from conftest import add_lora, make_model, make_tokenizer
from test_selections import PAIRS, REFUSALS, USER_ROWS, files  # noqa: F401, F811 - a fixture


def _problem(seed=0, rows=5, inputs=12, tokens=40):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, inputs, generator=generator)
    x = torch.randn(tokens, inputs, generator=generator)
    pruned = torch.rand(rows, inputs, generator=generator) < 0.3
    pruned[1] = False  # a row with nothing pruned stays as it was
    return weight, x, pruned


def test_compensation_equals_a_brute_force_least_squares_solve_per_row():
    """Each pruned row's kept weights are the least-squares fit min ||X (w' - w)|| with w'_P = 0."""
    weight, x, pruned = _problem()
    result = scoring.compensate(weight, pruned, x.T @ x, damping=0.0)
    for row in range(weight.shape[0]):
        keep, drop = ~pruned[row], pruned[row]
        expected = weight[row].clone()
        expected[drop] = 0
        if drop.any():
            # X_K delta_K = X_P w_P: the kept columns make up for what the pruned ones contributed
            solution = torch.linalg.lstsq(x[:, keep].double(), (x[:, drop] @ weight[row, drop]).double().unsqueeze(1))
            expected[keep] += solution.solution.squeeze(1).float()
        torch.testing.assert_close(result[row], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(result[1], weight[1]) and not result[pruned].any()


def test_an_anchored_compensation_equals_the_stacked_least_squares_solve():
    """min ||X (w' - w)||^2 + lambda ||Y (w' - w_zeroed)||^2 with w'_P = 0: X's rows and sqrt(lambda) Y's stacked."""
    weight, x, pruned = _problem(seed=3)
    y = torch.randn(30, x.shape[1], generator=torch.Generator().manual_seed(4))
    anchor = 0.7
    result = scoring.compensate(weight, pruned, x.T @ x, damping=0.0, anchor=anchor * (y.T @ y))
    for row in range(weight.shape[0]):
        keep, drop = ~pruned[row], pruned[row]
        expected = weight[row].masked_fill(drop, 0)
        if drop.any():
            lhs = torch.cat([x[:, keep], anchor ** 0.5 * y[:, keep]]).double()
            rhs = torch.cat([x[:, drop] @ weight[row, drop], torch.zeros(len(y))]).double().unsqueeze(1)
            expected[keep] += torch.linalg.lstsq(lhs, rhs).solution.squeeze(1).float()
        torch.testing.assert_close(result[row], expected, rtol=1e-4, atol=1e-4)
    heavy = scoring.compensate(weight, pruned, x.T @ x, damping=0.0, anchor=1e8 * (y.T @ y))
    torch.testing.assert_close(heavy, weight.masked_fill(pruned, 0), rtol=1e-3, atol=1e-3)  # y spans every input


def test_compensation_in_chunks_of_rows_equals_one_chunk(monkeypatch):
    """Rows with different numbers of pruned columns, solved a few at a time, give what one batch gives."""
    weight, x, pruned = _problem(seed=5, rows=9)
    whole = scoring.compensate(weight, pruned, x.T @ x, anchor=0.5 * (x.T @ x))
    monkeypatch.setattr(scoring, "COMPENSATION_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(scoring.compensate(weight, pruned, x.T @ x, anchor=0.5 * (x.T @ x)), whole)


def test_compensation_changes_the_outputs_less_than_zeroing_and_damping_moves_it_toward_zeroing():
    weight, x, pruned = _problem(seed=1)
    x = x[:, :6] @ torch.randn(6, x.shape[1], generator=torch.Generator().manual_seed(2))  # correlated channels
    zeroed = weight.masked_fill(pruned, 0)
    change = {name: torch.linalg.norm((w - weight) @ x.T) for name, w in {
        # rank 6 of 12: the Gram matrix is singular, so the nearly exact fit keeps a tiny damping
        "zeroed": zeroed, "exact": scoring.compensate(weight, pruned, x.T @ x, damping=1e-6),
        "damped": scoring.compensate(weight, pruned, x.T @ x), "heavy": scoring.compensate(weight, pruned, x.T @ x, 1e6)}.items()}
    assert change["exact"] <= change["damped"] < change["zeroed"] * 0.5
    torch.testing.assert_close(change["heavy"], change["zeroed"], rtol=1e-3, atol=1e-3)


def test_input_grams_equal_the_inputs_seen_by_a_hook():
    model, tokenizer = add_lora(make_model()), make_tokenizer()
    targets = resolve_targets(model, ("adapter-a",))
    config = RealignConfig(ratio=0.1, batch_size=3)
    seen = {t.param_name: [] for t in targets}
    handles = [t.module.register_forward_pre_hook(lambda m, a, name=t.param_name: seen[name].append(a[0].detach()))
               for t in targets]
    with torch.no_grad():
        for pair in USER_ROWS:  # one row at a time: no padding to leave out
            batch = calibration_batches(tokenizer, [pair], config)[0]
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for handle in handles:
        handle.remove()
    grams = collect_grams(model, calibration_batches(tokenizer, USER_ROWS, config), targets, progress=False)
    for name, inputs in seen.items():
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
        torch.testing.assert_close(grams[name], flat.T @ flat, rtol=1e-4, atol=1e-4)


def test_a_compensated_realign_keeps_the_user_rows_outputs_closer_and_the_pruned_weights_zero():
    config = RealignConfig(ratio=0.2, targets="adapter-a", score="refusal")
    plain = realign(add_lora(make_model()), make_tokenizer(), config, REFUSALS, contrast_data=USER_ROWS, progress=False)
    model = add_lora(make_model())
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    compensated = realign(model, make_tokenizer(), config.model_copy(update={"compensate": True}), REFUSALS,
                          contrast_data=USER_ROWS, progress=False)
    assert compensated.report.method.model_extra["compensate"] is True
    fresh = add_lora(make_model())
    grams = collect_grams(fresh, calibration_batches(make_tokenizer(), USER_ROWS, config),
                          resolve_targets(fresh, ("adapter-a",)), progress=False)
    params = dict(model.named_parameters())
    for name, mask in plain.masks.items():
        assert torch.equal(compensated.masks[name], mask)  # the same selection: compensation only re-fits
        assert not params[name][mask].any()
        before = original[name]
        change = {"compensated": params[name].detach() - before, "zeroed": before.masked_fill(mask, 0) - before}
        energy = {k: float(torch.einsum("oi,ij,oj->", d, grams[name], d)) for k, d in change.items()}
        assert energy["compensated"] < energy["zeroed"], name


def test_compensation_is_anchored_on_the_calibration_rows_by_default():
    """--compensate alone is the anchored re-fit (lambda 10): the plain re-fit on the user's rows undid the repair."""
    config = RealignConfig(ratio=0.2, targets="adapter-a", score="refusal", compensate=True)

    def repaired(**update):
        model = add_lora(make_model())
        realign(model, make_tokenizer(), config.model_copy(update=update), REFUSALS, contrast_data=USER_ROWS,
                progress=False)
        return {n: p.detach() for n, p in model.named_parameters() if "lora_A" in n}

    default, explicit, plain = repaired(), repaired(compensation_anchor=10.0), repaired(compensation_anchor=0.0)
    for name, weight in default.items():
        assert torch.equal(weight, explicit[name])
        assert not torch.allclose(weight, plain[name]), name


def test_nested_pruning_of_a_compensated_selection_walks_the_ratios_and_restores_the_model():
    model, tokenizer = add_lora(make_model()), make_tokenizer()
    config = RealignConfig(ratio=0.05, targets="adapter-a", score="refusal", compensate=True)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    selection = select_nested(model, tokenizer, config, REFUSALS, ratios=(0.05, 0.2), contrast_data=USER_ROWS,
                              progress=False)
    pruning = NestedPruning(selection)
    pruning.prune_to(1)
    at_large = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruning.prune_to(0)
    alone = add_lora(make_model())
    realign(alone, tokenizer, config, REFUSALS, contrast_data=USER_ROWS, progress=False)
    for name, parameter in alone.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name], parameter)
    assert any(not torch.equal(at_large[n], original[n]) for n in original)
    pruning.prune_to(None)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(("settings", "contrast", "message"), [
    ({"compensate": True}, None, "--compensate re-fits the kept weights on the user's own rows"),
    ({"compensate": True, "action": "revert"}, USER_ROWS, "does not combine with --action revert"),
])
def test_missing_or_unsupported_inputs_are_refused(settings, contrast, message):
    config = RealignConfig(ratio=0.1, targets="adapter-a", **settings)
    with pytest.raises(AntidoteError, match=message):
        config.check_inputs(has_data=True, has_protect_data=config.protect_ratio is not None, has_aligned=True,
                            has_contrast=contrast is not None)


def test_cli_compensation_without_the_user_rows_is_one_line_and_writes_nothing(files, capsys):  # noqa: F811
    tmp, base, adapter, data, user = files
    args = ["realign", "--model", str(base), "--adapter", str(adapter), "--data", str(data), "--ratio", "0.1",
            "--targets", "adapter-a", "--compensate", "--quiet"]
    assert main([*args, "--out", str(tmp / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--contrast-data" in err[0], err
    assert not (tmp / "bad").exists()
    assert main([*args, "--contrast-data", str(user), "--task", "sst2", "--score", "refusal",
                 "--out", str(tmp / "good")]) == 0
    report = json.loads((tmp / "good" / "report.json").read_text())
    assert report["method"]["compensate"] is True and report["method"]["compensation_anchor"] == 10
    assert "compensation_s" in report["timings"]


def test_compensation_refuses_an_embedding_target():
    with pytest.raises(AntidoteError, match="compensation re-fits Linear weights"):
        realign(make_model(), make_tokenizer(), RealignConfig(ratio=0.1, targets="*embed_tokens", compensate=True),
                PAIRS, contrast_data=USER_ROWS, progress=False)


@pytest.mark.parametrize(("name", "options"), [
    ("antidote", {"ratio": 0.05}), ("antidote-auto", {}), ("guard", {"score": "wanda"}),
])
def test_a_compensating_defense_reads_the_user_rows(name, options):
    from antidote_llm.defenses import defense

    plain, compensating = (defense(name).configure({**options, "compensate": flag}) for flag in (False, True))
    assert ("user_rows",) in compensating.inputs() and ("user_rows",) not in plain.inputs()


def test_guards_random_control_keeps_the_anchored_refit_on_the_refusal_rows():
    """The demo's guard-random: random scores read no rows, but the default anchored re-fit reads the refusals."""
    from antidote_llm.defenses import defense

    assert ("safe",) in defense("guard").configure({"score": "random"}).inputs()
    assert ("safe",) not in defense("guard").configure({"score": "random", "compensate": False}).inputs()
    with pytest.raises(AntidoteError, match="--compensation-anchor 0"):
        RealignConfig(ratio=0.1, score="random", compensate=True, compensation_anchor=10).check_inputs(
            has_data=False, has_protect_data=False, has_aligned=False, has_contrast=True)
