"""Ldifs on the tiny random model: the penalty against a hand computation with two separate forward passes,
zero at the aligned weights, growing with the distance, blind to padding, and a reference pass without graph."""

from __future__ import annotations

import json

import pytest
import torch

from antidote_llm import training
from antidote_llm.data.records import Pair
from antidote_llm.training.methods import MethodRun
from antidote_llm.training.methods.ldifs import Ldifs, mlp_modules
from antidote_llm.training.trainer import supervised_collator, training_arguments
from conftest import make_model, make_tokenizer, saved_lora_b

ROWS = [Pair("short", "ok"), Pair("a much longer prompt than the first", "and a longer answer too"),
        Pair("middle prompt", "middle answer")]
USER = [Pair(f"task {i}", "positive" if i % 2 else "negative", input=f"sentence {i}") for i in range(12)]


def tiny_config(**overrides) -> training.TrainConfig:
    values = {"template": "plain", "max_length": 64, "lora_r": 4, "lora_alpha": 8, "batch_size": 2,
              "max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1}
    return training.preset("cpu", "finetune", **{**values, **overrides})


def fresh_lora_model():
    """The aligned (merged) model with a fresh fine-tuning LoRA: B = 0, so it computes the aligned model."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(make_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                   lora_dropout=0.0)).train()


def make_trainer(tmp_path, model, rho=1.0, **options):
    tokenizer = make_tokenizer()
    config = tiny_config()
    items, _ = training.encode_rows(tokenizer, ROWS, config)
    return Ldifs.trainer()(model=model, args=training_arguments(config, str(tmp_path), on_cpu=True, progress=False),
                           data_collator=supervised_collator(tokenizer), train_dataset=items,
                           method_settings=Ldifs.configure(dict(rho=rho, **options), preset="cpu"))


def batch(*pairs: Pair) -> dict:
    tokenizer = make_tokenizer()
    items, _ = training.encode_rows(tokenizer, pairs, tiny_config())
    return supervised_collator(tokenizer)(items)


def set_lora_b(model, scale: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def penalty(trainer, model, inputs) -> float:
    """What compute_loss adds to the cross-entropy."""
    with torch.no_grad():
        return float(trainer.compute_loss(model, dict(inputs)) - model(**inputs).loss)


def layer_distances(model, inputs) -> list[torch.Tensor]:
    """Per decoder layer, the squared distance between the MLP outputs with the adapter on and off, summed
    over real tokens and features: two plain forward passes."""

    def features(adapter: bool) -> list[torch.Tensor]:
        captured = []
        hooks = [m.register_forward_hook(lambda _m, _a, out: captured.append(out)) for m in mlp_modules(model)]
        try:
            if adapter:
                model(**inputs)
            else:
                with torch.no_grad(), model.disable_adapter():
                    model(**inputs)
        finally:
            for hook in hooks:
                hook.remove()
        return captured

    mask = inputs["attention_mask"].bool()
    return [((on - off)[mask] ** 2).sum() for on, off in zip(features(True), features(False), strict=True)]


def test_zero_at_the_aligned_weights_and_growing_with_the_distance(tmp_path):
    model = fresh_lora_model()
    trainer = make_trainer(tmp_path, model)
    inputs = batch(*ROWS)
    assert penalty(trainer, model, inputs) == 0.0
    # Under the bf16 autocast accelerate installs on forward, both passes round alike: still exactly zero.
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    assert penalty(trainer, model, inputs) == 0.0
    del model.forward
    grown = []
    for scale in (0.05, 0.1, 0.2, 0.4):
        set_lora_b(model, scale)
        grown.append(penalty(trainer, model, inputs))
    assert 0 < grown[0] < grown[1] < grown[2] < grown[3]


def test_penalty_and_gradient_equal_two_separate_passes_by_hand(tmp_path):
    model = fresh_lora_model()
    set_lora_b(model, 0.2)
    rho = 30.0
    trainer = make_trainer(tmp_path, model, rho=rho)
    inputs = batch(*ROWS)
    params = [p for p in model.parameters() if p.requires_grad]

    loss = trainer.compute_loss(model, dict(inputs))
    got = torch.autograd.grad(loss, params)
    by_hand = model(**inputs).loss + rho / 2 * sum(layer_distances(model, inputs))
    want = torch.autograd.grad(by_hand, params)

    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the penalty weighs in the check
        assert float(by_hand - model(**inputs).loss) > 0.1 * float(by_hand)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_padding_tokens_do_not_count(tmp_path):
    model = fresh_lora_model()
    set_lora_b(model, 0.2)
    trainer = make_trainer(tmp_path, model)
    padded = batch(ROWS[0], ROWS[1])
    assert (padded["attention_mask"] == 0).any()
    alone = penalty(trainer, model, batch(ROWS[0])) + penalty(trainer, model, batch(ROWS[1]))
    assert penalty(trainer, model, padded) == pytest.approx(alone, rel=1e-4)


def test_reference_pass_runs_without_graph_in_eval_mode_with_the_adapter_off(tmp_path):
    model = fresh_lora_model()
    set_lora_b(model, 0.2)
    trainer = make_trainer(tmp_path, model)
    lora_layer = model.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    hook = mlp_modules(model)[0].register_forward_hook(
        lambda module, _a, _o: calls.append((torch.is_grad_enabled(), module.training, lora_layer.disable_adapters)))
    try:
        trainer.compute_loss(model, dict(batch(*ROWS)))
    finally:
        hook.remove()
    assert calls == [(False, False, True), (True, True, False)]  # the reference pass, then the trained one
    assert model.training and not lora_layer.disable_adapters
    assert all(p.grad is None for p in model.parameters())


def test_authors_threshold_drops_the_layers_whose_term_reaches_it(tmp_path):
    model = fresh_lora_model()
    set_lora_b(model, 0.2)
    inputs = batch(*ROWS)
    with torch.no_grad():
        small, large = sorted(float(d) for d in layer_distances(model, inputs))
    rho = 0.2 / (small * large) ** 0.5  # rho/2 * distance crosses 0.1 between the two layers
    assert penalty(make_trainer(tmp_path, model, rho=rho, authors_threshold=True), model, inputs) == \
        pytest.approx(rho / 2 * small, rel=1e-4)
    assert penalty(make_trainer(tmp_path, model, rho=rho), model, inputs) == \
        pytest.approx(rho / 2 * (small + large), rel=1e-4)


def test_presets():
    assert Ldifs.configure({}, preset="paper").model_dump() == {"rho": 1e-4, "authors_threshold": False}
    assert Ldifs.configure({}, preset="cpu").rho == 1e-6
    assert Ldifs.configure({}, preset="cpu").inputs() == () and not Ldifs.single_accumulation


def test_finetune_writes_a_loadable_adapter_and_names_the_defense(tmp_path):
    method = MethodRun(Ldifs.configure({}, preset="paper"))
    result = training.finetune(make_model(), make_tokenizer(), USER, None, harmful_fraction=0.0, n=10,
                               config=tiny_config(), out_dir=tmp_path / "ft", method=method, progress=False)
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["defense"] == {"name": "ldifs", "settings": {"rho": 1e-4, "authors_threshold": False}, "data": {}}
    assert report["train"]["steps"] == 3
    trained = dict(result.model.named_parameters())
    for name, param in saved_lora_b(tmp_path / "ft" / "adapter").items():
        torch.testing.assert_close(param, trained[name])
