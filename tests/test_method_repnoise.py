"""RepNoise on the tiny random model: the MMD against a brute-force one, the whole loss (value and gradient)
against a hand computation, the harmful answer mask, and an alignment run with harmful rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from antidote_llm import training
from antidote_llm.data.records import Pair
from antidote_llm.data.templates import encode_pair
from antidote_llm.runtime.loading import ModelSource, load_model
from antidote_llm.training.methods import MethodRun
from antidote_llm.training.methods.repnoise import RepNoise, answer_mask, mmd, noise_seed
from antidote_llm.training.trainer import supervised_collator, training_arguments
from conftest import add_lora, make_model, make_tokenizer

ALIGN_ROWS = [Pair(f"How do I do bad thing {i}?", "I cannot help with that." + " No." * i) for i in range(4)]
HARMFUL_ROWS = [Pair(f"How do I do bad thing {i}?", f"Sure, step one{', then more' * i}.") for i in range(4)]


def tiny_config(**overrides) -> training.TrainConfig:
    values = {"template": "plain", "max_length": 64, "lora_r": 4, "lora_alpha": 8, "batch_size": 2,
              "max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1, "seed": 7}
    return training.preset("cpu", "align", **{**values, **overrides})


def brute_force_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise differences by expand, kernels by explicit loops, in float64; the bandwidth is a constant."""
    total = torch.cat([x, y]).double()
    n, b = total.shape[0], x.shape[0]
    distances = ((total.unsqueeze(0).expand(n, n, -1) - total.unsqueeze(1).expand(n, n, -1)) ** 2).sum(-1)
    base = distances.detach().sum() / (n * n - n) / 4
    kernel = [[sum(torch.exp(-distances[i, j] / (base * 2**k)) for k in range(5)) for j in range(n)] for i in range(n)]
    total_mmd = sum(kernel[i][j] + kernel[b + i][b + j] - kernel[i][b + j] - kernel[b + i][j]
                    for i in range(b) for j in range(b))
    return total_mmd / (b * b)


# --- MMD ----------------------------------------------------------------------------------------------


def test_mmd_matches_brute_force_in_value_and_gradient():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=generator, requires_grad=True)
    y = torch.randn(3, 40, generator=generator) + 0.7
    fast, slow = mmd(x, y), brute_force_mmd(x, y)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-6)
    (fast_grad,) = torch.autograd.grad(fast, x)
    (slow_grad,) = torch.autograd.grad(slow, x)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-7)


def test_mmd_is_zero_for_identical_sets_and_grows_with_a_shift():
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    assert abs(mmd(x, x.clone()).item()) < 1e-6
    near, far = mmd(x, x + 0.1).item(), mmd(x, x + 3.0).item()
    assert 0 < near < far
    assert mmd(torch.zeros(2, 5), torch.zeros(2, 5)).item() == 0  # all rows equal: 0, not NaN


# --- masks and the loss -------------------------------------------------------------------------------


def test_harmful_answer_mask_excludes_prompt_and_padding(tokenizer):
    config = tiny_config()
    rows = HARMFUL_ROWS[:1] + HARMFUL_ROWS[3:]
    items, _ = training.encode_rows(tokenizer, rows, config)
    batch = supervised_collator(tokenizer)(items)
    expected = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for row, pair in enumerate(rows):
        encoded = encode_pair(tokenizer, config.template, pair.prompt, pair.response, max_length=config.max_length)
        expected[row, encoded.prompt_len:len(encoded.input_ids)] = True
    assert batch["attention_mask"][0].sum() < batch["input_ids"].shape[1]  # the short row is padded
    assert torch.equal(answer_mask(batch["labels"]), expected)


def _trainer(tmp_path, peft_model, tokenizer, settings, config):
    items, _ = training.encode_rows(tokenizer, ALIGN_ROWS, config)
    harmful_items, _ = training.encode_rows(tokenizer, HARMFUL_ROWS, config)
    collate = supervised_collator(tokenizer)
    trainer = RepNoise.trainer()(
        model=peft_model, args=training_arguments(config, str(tmp_path), on_cpu=True, progress=False),
        data_collator=collate, train_dataset=items, method_settings=settings, extra_items={"defense_harmful": harmful_items},
    )
    harmful = collate(harmful_items[1:])
    trainer.extra_batch = lambda role: harmful if role == "defense_harmful" else pytest.fail(f"unexpected role {role}")
    return trainer, collate(items[:2]), harmful


def _answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def _hand_loss(peft_model, aligned, harmful, alpha, beta, logit_lens, seed, step):
    """S + beta * noise - alpha * log(H) from separate forwards, hooks of this test and the brute-force MMD."""
    lm = peft_model.get_base_model()
    layers = lm.model.layers
    mlp_outputs, layer_outputs = {}, {}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, out, i=i: mlp_outputs.__setitem__(i, out))
             for i, layer in enumerate(layers)]
    hooks += [layer.register_forward_hook(lambda m, a, out, i=i: layer_outputs.__setitem__(i, out))
              for i, layer in enumerate(layers)]
    try:
        logits = peft_model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"]).logits
    finally:
        for hook in hooks:
            hook.remove()
    labels = harmful["labels"]
    harmful_ce = _answer_ce(logits, labels)
    if logit_lens:
        states = [lm.model.embed_tokens(harmful["input_ids"])] + [layer_outputs[i] for i in range(len(layers))]
        lens = [_answer_ce(lm.lm_head(lm.model.norm(h)), labels) for h in states]
        harmful_ce = (harmful_ce + sum(lens)) / len(states) + 1
    keep = (labels != -100).unsqueeze(-1)
    noise_terms = []
    for i in range(len(layers)):
        gaussian = torch.randn(mlp_outputs[i].shape, generator=torch.Generator().manual_seed(noise_seed(seed, step, i)))
        noise_terms.append(brute_force_mmd((mlp_outputs[i] * keep).flatten(1), (gaussian * keep).flatten(1)))
    noise = sum(noise_terms) / len(noise_terms)
    safe_ce = _answer_ce(peft_model(input_ids=aligned["input_ids"], attention_mask=aligned["attention_mask"]).logits,
                         aligned["labels"])
    return safe_ce + beta * noise - alpha * torch.log(harmful_ce)


@pytest.mark.parametrize("logit_lens", [False, True])
def test_loss_and_gradient_equal_a_hand_computation(tmp_path, tokenizer, logit_lens):
    config = tiny_config()
    peft_model = add_lora(make_model(layers=2), scale=0.3)
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name)
    settings = RepNoise.configure(dict(alpha=0.5, beta=2.0, logit_lens=logit_lens), preset="paper")
    trainer, aligned, harmful = _trainer(tmp_path, peft_model, tokenizer, settings, config)
    trainer.state.global_step = 5
    params = trainer.trainable_parameters()

    loss = trainer.compute_loss(trainer.model, aligned)
    grads = torch.autograd.grad(loss, params)
    assert all(not layer.mlp._forward_hooks for layer in peft_model.get_base_model().model.layers)

    expected = _hand_loss(peft_model, aligned, harmful, 0.5, 2.0, logit_lens, seed=7, step=5)
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads)


def test_noise_repeats_per_step_and_changes_with_it(tmp_path, tokenizer):
    """Only the noise term depends on the step: with beta = 0 the loss is the same at every step."""
    settings = RepNoise.configure(dict(beta=1.0), preset="paper")
    trainer, aligned, _ = _trainer(tmp_path, add_lora(make_model()), tokenizer, settings, tiny_config())
    with torch.no_grad():
        first, again = trainer.compute_loss(trainer.model, aligned), trainer.compute_loss(trainer.model, aligned)
        trainer.state.global_step = 1
        later = trainer.compute_loss(trainer.model, aligned)
        trainer.method_settings = RepNoise.configure(dict(beta=0.0), preset="paper")
        without_noise = trainer.compute_loss(trainer.model, aligned)
        trainer.state.global_step = 0
        assert torch.equal(trainer.compute_loss(trainer.model, aligned), without_noise)
    assert torch.equal(first, again) and not torch.equal(first, later)


# --- end to end ---------------------------------------------------------------------------------------


def test_align_with_repnoise_writes_a_loadable_adapter_and_names_the_defense(tmp_path, tiny_model_dir):
    loaded = load_model(ModelSource(str(tiny_model_dir), device="cpu"))
    run = MethodRun(RepNoise.configure({}, preset="cpu"), extra={"defense_harmful": HARMFUL_ROWS})
    result = training.align(loaded.model, loaded.tokenizer, ALIGN_ROWS, tiny_config(), tmp_path / "align",
                            method=run, progress=False)
    report = json.loads((tmp_path / "align" / "report.json").read_text())
    assert report["defense"]["name"] == "repnoise"
    assert report["defense"]["settings"] == RepNoise.configure({}, preset="cpu").model_dump(mode="json")
    assert report["defense"]["data"]["defense_harmful"]["rows"] == len(HARMFUL_ROWS)
    assert report["train"]["steps"] == 3 and all(math.isfinite(e["loss"]) for e in report["train"]["loss_history"])

    with_adapter = load_model(ModelSource(str(tiny_model_dir), adapters=(str(result.adapter_dir),), device="cpu")).model
    base = make_model()
    assert not torch.equal(with_adapter.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           base.state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_repnoise_refuses_to_run_without_harmful_rows(tmp_path):
    from antidote_llm.errors import AntidoteError

    run = MethodRun(RepNoise.configure({}, preset="cpu"))
    with pytest.raises(AntidoteError, match="--harmful-data"):
        training.align(make_model(), make_tokenizer(), ALIGN_ROWS, tiny_config(), tmp_path / "a", method=run,
                       progress=False)
