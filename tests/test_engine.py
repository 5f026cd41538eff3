"""Antidote on tiny random models: statistics, targets, options, and the oracle (the authors' algorithm)."""

import pytest
import torch

from antidote_llm.core.oracle import oracle_masks
from antidote_llm.core.realign import RealignConfig, apply_masks, calibration_batches, realign
from antidote_llm.core.statistics import collect_statistics
from antidote_llm.core.targets import resolve_targets
from antidote_llm.data.records import Pair
from antidote_llm.errors import AntidoteError
from conftest import HARMFUL_ROWS, add_lora, make_model, make_tokenizer

PAIRS = [Pair(r["prompt"], r["response"]) for r in HARMFUL_ROWS if not r["is_safe"]]
BENIGN = [Pair(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(8)]


def stats_for(model, tokenizer, targets, **config):
    cfg = RealignConfig(ratio=0.1, **config)
    return collect_statistics(model, calibration_batches(tokenizer, PAIRS, cfg), targets, progress=False)


def brute_force_mean_sq(model, tokenizer, target, response_only=False, template="alpaca"):
    """One row at a time, no padding: capture the module's input and average x^2 over counted tokens."""
    from antidote_llm.data.templates import encode_pair

    captured = []
    handle = target.module.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    total, count = 0, 0
    with torch.no_grad():
        for pair in PAIRS:
            enc = encode_pair(tokenizer, template, pair.prompt, pair.response)
            captured.clear()
            model(input_ids=torch.tensor([enc.input_ids]))
            x = captured[0][0]
            if response_only:
                x = x[enc.prompt_len:]
            total = total + (x.double() ** 2).sum(0)
            count += x.shape[0]
    handle.remove()
    return (total / count).float()


@pytest.mark.parametrize("tokens", ["all", "response"])
def test_batched_statistics_equal_unpadded_brute_force(tokens):
    model, tokenizer = make_model(), make_tokenizer()
    targets = resolve_targets(model, ["all-linear"])
    stats = stats_for(model, tokenizer, targets, batch_size=5, tokens=tokens)
    for target in targets:
        expected = brute_force_mean_sq(model, tokenizer, target, response_only=tokens == "response")
        torch.testing.assert_close(stats[target.param_name].mean_sq, expected, rtol=1e-4, atol=1e-6)


def test_padding_does_not_change_statistics():
    model, tokenizer = make_model(), make_tokenizer()
    targets = resolve_targets(model, ["all-linear"])
    one = stats_for(model, tokenizer, targets, batch_size=1)
    many = stats_for(model, tokenizer, targets, batch_size=7)
    for name in one:
        assert one[name].tokens == many[name].tokens
        torch.testing.assert_close(one[name].mean_sq, many[name].mean_sq, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", ["qkv", "all-linear"])
def test_masks_equal_the_oracle_full_model(spec):
    model, tokenizer = make_model(), make_tokenizer()
    targets = resolve_targets(model, [spec])
    expected = oracle_masks(model, tokenizer, PAIRS, targets, ratio=0.1)
    result = realign(model, tokenizer, RealignConfig(ratio=0.1, targets=(spec,), batch_size=4), PAIRS, progress=False)
    assert set(result.masks) == set(expected)
    for name, mask in expected.items():
        assert torch.equal(result.masks[name], mask), name


def test_masks_equal_the_oracle_adapter():
    model, tokenizer = add_lora(make_model()), make_tokenizer()
    targets = resolve_targets(model, ["adapter"])
    assert {t.module_name.split(".")[-2] for t in targets} == {"lora_A", "lora_B"}
    expected = oracle_masks(model, tokenizer, PAIRS, targets, ratio=0.05)
    result = realign(model, tokenizer, RealignConfig(ratio=0.05, batch_size=3), PAIRS, progress=False)
    assert result.report.method.targets == ["adapter"]
    for name, mask in expected.items():
        assert torch.equal(result.masks[name], mask), name


def test_lora_b_statistics_are_over_a_times_x():
    model, tokenizer = add_lora(make_model()), make_tokenizer()
    targets = resolve_targets(model, ["adapter"])
    stats = stats_for(model, tokenizer, targets, batch_size=4)
    lora_b = next(t for t in targets if t.module_name.endswith("q_proj.lora_B.default"))
    lora_a = dict(model.named_modules())[lora_b.module_name.replace("lora_B", "lora_A")]
    outputs = []
    handle = lora_a.register_forward_hook(lambda m, a, out: outputs.append(out.detach()[0]))
    expected = brute_force_mean_sq(model, tokenizer, lora_b)
    handle.remove()
    a_x = torch.cat(outputs)
    torch.testing.assert_close(expected, (a_x.double() ** 2).mean(0).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats[lora_b.param_name].mean_sq, expected, rtol=1e-4, atol=1e-6)


def test_zero_action_prunes_in_place_exactly_the_mask():
    model, tokenizer = make_model(), make_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = realign(model, tokenizer, RealignConfig(ratio=0.2, targets=("mlp",)), PAIRS, progress=False)
    params = dict(model.named_parameters())
    for name, before_value in before.items():
        if name in result.masks:
            mask = result.masks[name]
            assert (params[name][mask] == 0).all()
            assert torch.equal(params[name][~mask], before_value[~mask])
        else:
            assert torch.equal(params[name], before_value), name


def test_scores_differ_and_are_deterministic():
    tokenizer = make_tokenizer()
    masks = {}
    for score in ("wanda", "magnitude", "random"):
        runs = [realign(make_model(), tokenizer, RealignConfig(ratio=0.1, score=score, targets=("qkv",), seed=3), PAIRS, progress=False).masks for _ in range(2)]
        for name in runs[0]:
            assert torch.equal(runs[0][name], runs[1][name])
        masks[score] = runs[0]
    name = next(iter(masks["wanda"]))
    assert not torch.equal(masks["wanda"][name], masks["magnitude"][name])
    assert not torch.equal(masks["magnitude"][name], masks["random"][name])
    # magnitude needs no data: the top |W| per row
    weight = dict(make_model().named_parameters())[name]
    top = weight.abs().argmax(1)
    assert masks["magnitude"][name][torch.arange(weight.shape[0]), top].all()


def test_magnitude_needs_no_data_but_wanda_does():
    tokenizer = make_tokenizer()
    realign(make_model(), tokenizer, RealignConfig(ratio=0.1, score="magnitude"), None, progress=False)
    with pytest.raises(AntidoteError, match="calibration data"):
        realign(make_model(), tokenizer, RealignConfig(ratio=0.1), None, progress=False)


@pytest.mark.parametrize("granularity", ["row", "matrix", "global"])
def test_granularities_prune_the_asked_fraction(granularity):
    model, tokenizer = make_model(), make_tokenizer()
    result = realign(model, tokenizer, RealignConfig(ratio=0.25, granularity=granularity, targets=("all-linear",)), PAIRS, progress=False)
    totals = result.report.totals
    assert totals.pruned == sum(int(m.sum()) for m in result.masks.values())
    assert abs(totals.pruned_fraction - 0.25) < 0.01
    per_tensor = [m.float().mean().item() for m in result.masks.values()]
    if granularity == "global":
        assert max(per_tensor) - min(per_tensor) > 0.01  # tensors compete for one budget
    else:
        assert all(abs(f - 0.25) < 0.01 for f in per_tensor)


def test_named_target_sets():
    model = make_model()

    def leaves(spec):
        return sorted({t.module_name.split(".")[-1] for t in resolve_targets(model, [spec])})

    assert leaves("qkv") == ["k_proj", "q_proj", "v_proj"]
    assert leaves("attention") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert leaves("mlp") == ["down_proj", "gate_proj", "up_proj"]
    assert len(resolve_targets(model, ["all-linear"])) == 2 * 7
    assert [t.module_name for t in resolve_targets(model, ["model.layers.1.*.q_proj"])] == ["model.layers.1.self_attn.q_proj"]
    assert all("embed" not in t.module_name and "lm_head" not in t.module_name for t in resolve_targets(model, ["all-linear"]))
    with pytest.raises(AntidoteError, match="match no"):
        resolve_targets(model, ["no.such.*"])
    with pytest.raises(AntidoteError, match="no fine-tuning adapter"):
        resolve_targets(model, ["adapter"])


def test_lm_head_and_embeddings_when_named_explicitly():
    model, tokenizer = make_model(), make_tokenizer()
    targets = resolve_targets(model, ["lm_head", "model.embed_tokens"])
    stats = stats_for(model, tokenizer, targets)
    head = next(t for t in targets if t.module_name == "lm_head")
    torch.testing.assert_close(stats[head.param_name].mean_sq, brute_force_mean_sq(model, tokenizer, head), rtol=1e-4, atol=1e-6)
    embed = next(t for t in targets if t.layout == "embedding")
    counts = stats[embed.param_name].sum_sq
    assert counts.sum() == stats[embed.param_name].tokens  # one-hot inputs: squared norms are token counts
    result = realign(model, tokenizer, RealignConfig(ratio=0.1, targets=("model.embed_tokens",)), PAIRS, progress=False)
    mask = result.masks["model.embed_tokens.weight"]
    assert mask.shape == model.model.embed_tokens.weight.shape
    unseen = counts == 0
    assert not mask[unseen].any()  # a token never seen has score 0 and is pruned last


def test_scoring_stops_before_the_lm_head():
    model, tokenizer = make_model(), make_tokenizer()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    stats_for(model, tokenizer, resolve_targets(model, ["qkv"]))
    assert calls == []


def test_gpt2_conv1d_is_scored_in_linear_layout():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=258, n_embd=32, n_layer=2, n_head=2, n_positions=512)).eval()
    tokenizer = make_tokenizer()
    targets = resolve_targets(model, ["qkv"])
    assert [t.layout for t in targets] == ["conv1d", "conv1d"]
    expected = oracle_masks(model, tokenizer, PAIRS, targets, ratio=0.1)
    result = realign(model, tokenizer, RealignConfig(ratio=0.1, targets=("qkv",)), PAIRS, progress=False)
    for target in targets:
        assert result.masks[target.param_name].shape == target.weight.shape  # [in, out]
        assert torch.equal(result.masks[target.param_name], expected[target.param_name].t())


def test_protection_spares_weights_important_on_benign_data():
    tokenizer = make_tokenizer()
    plain = realign(make_model(), tokenizer, RealignConfig(ratio=0.2, targets=("qkv",)), PAIRS, progress=False)
    model = make_model()
    protected = realign(make_model(), tokenizer, RealignConfig(ratio=0.2, targets=("qkv",), protect_ratio=0.2), PAIRS, protect_data=BENIGN, progress=False)
    benign_top = realign(model, tokenizer, RealignConfig(ratio=0.2, targets=("qkv",)), BENIGN, progress=False).masks
    spared = 0
    for name, mask in plain.masks.items():
        assert torch.equal(protected.masks[name], mask & ~benign_top[name])
        spared += int((mask & benign_top[name]).sum())
    assert protected.report.totals.spared_by_protection == spared > 0
    assert protected.report.protection.spared == spared


def test_revert_restores_aligned_values():
    tokenizer = make_tokenizer()
    aligned = make_model(seed=5)
    model = make_model(seed=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = realign(model, tokenizer, RealignConfig(ratio=0.3, action="revert"), PAIRS, aligned=aligned, progress=False)
    ref = dict(aligned.named_parameters())
    for name, mask in result.masks.items():
        now = dict(model.named_parameters())[name]
        assert torch.equal(now[mask], ref[name][mask])
        assert torch.equal(now[~mask], before[name][~mask])


def test_revert_refuses_an_aligned_model_that_does_not_fit():
    with pytest.raises(AntidoteError, match="does not fit"):
        realign(make_model(), make_tokenizer(), RealignConfig(ratio=0.1, action="revert"), PAIRS,
                aligned=make_model(hidden=32), progress=False)


def test_apply_masks_reproduces_the_pruned_model():
    tokenizer = make_tokenizer()
    pruned = make_model()
    result = realign(pruned, tokenizer, RealignConfig(ratio=0.1, targets=("all-linear",)), PAIRS, progress=False)
    fresh = make_model()
    apply_masks(fresh, result.masks)
    for (name, a), (_, b) in zip(pruned.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(AntidoteError, match="does not fit"):
        apply_masks(make_model(hidden=32), result.masks)


def test_non_finite_weights_are_refused():
    model = make_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(AntidoteError, match="NaN"):
        realign(model, make_tokenizer(), RealignConfig(ratio=0.1), PAIRS, progress=False)


def test_report_counts_match_masks():
    result = realign(add_lora(make_model()), make_tokenizer(), RealignConfig(ratio=0.1), PAIRS, progress=False)
    report = result.report
    assert report.data.rows == len(PAIRS) and report.data.tokens > 0
    for name, entry in report.modules.items():
        assert entry.pruned == int(result.masks[name].sum())
        assert entry.scored == result.masks[name].numel()
    assert set(report.timings) == {"scoring_s", "selection_s"}


@pytest.mark.parametrize("spec", ["qkv", "attention", "all-linear", "model.layers.*.self_attn.q_proj"])
def test_merged_weight_targets_are_refused_on_a_live_adapter(spec):
    """On a PeftModel, non-adapter targets would prune base_layer weights apart from the update: refuse them,
    so a target means the same thing whatever way the model was loaded."""
    model = add_lora(make_model())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AntidoteError, match="live LoRA adapter"):
        realign(model, make_tokenizer(), RealignConfig(ratio=0.1, targets=spec), PAIRS, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_decoder_stack_comes_from_no_split_modules():
    from antidote_llm.core.targets import decoder_layers

    model = make_model()
    model.extra = torch.nn.ModuleList([torch.nn.Linear(4096, 4096)])  # more parameters than the decoder stack
    name, layers = decoder_layers(model)
    assert name == "model.layers" and layers is model.model.layers


@pytest.mark.parametrize(("spec", "factors"), [("adapter", {"lora_A", "lora_B"}), ("adapter-a", {"lora_A"}),
                                               ("adapter-b", {"lora_B"})])
def test_adapter_factor_sets(spec, factors):
    """adapter-a / adapter-b prune one LoRA factor; the other keeps every value."""
    model = add_lora(make_model())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = realign(model, make_tokenizer(), RealignConfig(ratio=0.1, targets=spec), PAIRS, progress=False)
    assert {name.split(".")[-3] for name in result.masks} == factors
    for name, param in model.named_parameters():
        if "lora_" in name and name.split(".")[-3] not in factors:
            assert torch.equal(param, before[name])
