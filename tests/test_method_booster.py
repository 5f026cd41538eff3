"""Booster on the tiny random Llama: the gradient handed to the optimizer against a hand computation, the
weights put back bit for bit after the simulated harmful step, and an alignment run with harmful rows."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call

from antidote_llm import training
from antidote_llm.data.records import Pair, PairSet
from antidote_llm.errors import AntidoteError
from antidote_llm.training.methods import MethodRun
from antidote_llm.training.methods.booster import Booster
from antidote_llm.training.sft import encode_rows, supervised_collator, training_arguments
from conftest import HARMFUL_ROWS, add_lora, make_model, make_tokenizer, saved_lora_b
from test_training import MEMO, adapter_tensors, tiny_config

HARMFUL = PairSet(pairs=tuple(Pair(row["prompt"], row["response"]) for row in HARMFUL_ROWS if not row["is_safe"]),
                  source="harmful.json", indices=tuple(range(12)))


def booster_trainer(tmp_path, model, tokenizer, **settings):
    config = tiny_config()
    items, _ = encode_rows(tokenizer, MEMO, config)
    harmful, _ = encode_rows(tokenizer, HARMFUL.pairs, config)
    trainer = Booster.trainer()(model=model, args=training_arguments(config, str(tmp_path), on_cpu=True, progress=False),
                                data_collator=supervised_collator(tokenizer), train_dataset=items,
                                method_settings=Booster.configure(settings, preset="paper"), extra_items={"defense_harmful": harmful})
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets with accumulation 1
    return trainer, supervised_collator(tokenizer)(items[:2])


def test_optimizer_gets_alignment_gradient_plus_lambda_times_the_harmful_gradient_drop(tmp_path, monkeypatch):
    lamb, alpha = 5.0, 0.5
    model = add_lora(make_model(), scale=0.3)
    trainer, batch = booster_trainer(tmp_path, model, make_tokenizer(), lamb=lamb, alpha=alpha, harmful_batch_size=3)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    drawn, draw = [], trainer.extra_batch
    monkeypatch.setattr(trainer, "extra_batch", lambda role: drawn.append(draw(role)) or drawn[-1])

    loss = trainer.training_step(model, batch)

    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # shift undone bit for bit
    seen = [p.grad.clone() for p in params]
    (harmful,) = drawn
    assert harmful["input_ids"].shape[0] == 3  # the setting's harmful batch size
    alignment_loss = model(**batch).loss
    g_a = torch.autograd.grad(alignment_loss, params)
    g_h = torch.autograd.grad(model(**harmful).loss, params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_h)) + 1e-7
    shifted = {n: (p - alpha * g / norm).detach().requires_grad_() for n, p, g in zip(names, params, g_h, strict=True)}
    g_shifted = torch.autograd.grad(functional_call(model, shifted, args=(), kwargs=harmful).loss, list(shifted.values()))

    torch.testing.assert_close(loss, alignment_loss.detach())
    regulariser = [lamb * (h - s) for h, s in zip(g_h, g_shifted, strict=True)]
    assert sum(r.norm() ** 2 for r in regulariser) > 0.01 * sum(g.norm() ** 2 for g in g_a)  # the term matters
    for grad, a, r in zip(seen, g_a, regulariser, strict=True):
        torch.testing.assert_close(grad, a + r, rtol=1e-4, atol=2e-5)  # entries up to ~1; lambda amplifies rounding


def test_align_with_booster_uses_the_harmful_rows_and_names_the_defense(tmp_path):

    tokenizer = make_tokenizer()
    settings = Booster.configure({}, preset="cpu")
    run = MethodRun(settings, {"defense_harmful": HARMFUL})
    result = training.align(make_model(), tokenizer, MEMO, tiny_config(max_steps=2), tmp_path / "booster", method=run,
                            progress=False)
    plain = training.align(make_model(), tokenizer, MEMO, tiny_config(max_steps=2), tmp_path / "sft", progress=False)

    report = json.loads((tmp_path / "booster" / "report.json").read_text())
    assert report["defense"]["name"] == "booster"
    assert report["defense"]["settings"] == {"lamb": 5.0, "alpha": 0.1, "harmful_batch_size": 8}
    assert report["defense"]["data"]["defense_harmful"] == HARMFUL.describe()
    assert report["train"]["steps"] == 2
    saved_lora_b(result.adapter_dir)
    trained, baseline = adapter_tensors(result.adapter_dir), adapter_tensors(plain.adapter_dir)
    assert any(not torch.equal(trained[k], baseline[k]) for k in trained)  # the regulariser changed training
    with pytest.raises(AntidoteError, match="needs --harmful-data"):
        training.align(make_model(), tokenizer, MEMO, tiny_config(), tmp_path / "none",
                       method=MethodRun(settings), progress=False)
