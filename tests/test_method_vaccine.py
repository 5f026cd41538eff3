"""Vaccine on the tiny random Llama: the perturbation's norm and direction, where and when it is added, the
gradient the optimizer sees, and an alignment run through the stage."""

from __future__ import annotations

import json

import pytest
import torch

from antidote_llm import training
from antidote_llm.errors import AntidoteError
from antidote_llm.training.methods import MethodRun, vaccine
from antidote_llm.training.methods.vaccine import Vaccine
from antidote_llm.training.sft import encode_rows, supervised_collator, training_arguments
from conftest import add_lora, make_model, make_tokenizer, saved_lora_b
from test_training import MEMO, adapter_tensors, tiny_config


def vaccine_trainer(tmp_path, model, tokenizer, rho=2.0):
    config = tiny_config()
    items, _ = encode_rows(tokenizer, MEMO, config)
    trainer = Vaccine.trainer()(model=model, args=training_arguments(config, str(tmp_path), on_cpu=True, progress=False),
                                data_collator=supervised_collator(tokenizer), train_dataset=items,
                                method_settings=Vaccine.configure(dict(rho=rho), preset="paper"))
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets with accumulation 1
    return trainer, supervised_collator(tokenizer)(items[:3])


def hooked_loss(model, batch, hook):
    handles = [layer.self_attn.register_forward_hook(hook(i)) for i, layer in enumerate(model.base_model.model.model.layers)]
    try:
        return model(**batch).loss
    finally:
        for handle in handles:
            handle.remove()


def record_layers(model):
    """Per forward pass and layer: the layer's input (the residual), the raw attention output and the input of the
    norm after the residual add. Registered before the trainer's hooks, the attention hook sees the raw output."""
    passes: list[dict[int, dict[str, torch.Tensor]]] = []
    handles = []
    for i, layer in enumerate(model.base_model.model.model.layers):
        def residual(module, args, kwargs, i=i):
            if i == 0:
                passes.append({})
            passes[-1][i] = {"residual": (args[0] if args else kwargs["hidden_states"]).detach()}

        handles += [
            layer.register_forward_pre_hook(residual, with_kwargs=True),
            layer.self_attn.register_forward_hook(lambda m, a, out, i=i: passes[-1][i].update(raw=out[0].detach())),
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, args, i=i: passes[-1][i].update(summed=args[0].detach())),
        ]
    return passes, handles


def test_second_pass_trains_under_the_rho_norm_ascent_perturbation(tmp_path, monkeypatch):
    rho = 2.0
    model = add_lora(make_model(layers=3), scale=0.3)
    trainer, batch = vaccine_trainer(tmp_path, model, make_tokenizer(), rho=rho)
    params = [p for p in model.parameters() if p.requires_grad]

    # By hand: dL/d(attention output) at the unperturbed point.
    outputs = []
    clean_loss = hooked_loss(model, batch, lambda i: lambda m, a, out: outputs.append(out[0]))
    clean_output_grads = torch.autograd.grad(clean_loss, outputs)
    clean_param_grads = torch.autograd.grad(model(**batch).loss, params)

    computed, used = vaccine.perturbations, []
    monkeypatch.setattr(vaccine, "perturbations", lambda grads, r: used.append(computed(grads, r)) or used[-1])
    passes, handles = record_layers(model)
    try:
        loss = trainer.training_step(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    seen = [p.grad.clone() for p in params]

    eps = used[0]
    assert sorted(eps) == [0, 1, 2]
    norm = torch.linalg.vector_norm(torch.stack([e.norm() for e in eps.values()]))
    torch.testing.assert_close(norm, torch.tensor(rho))  # one global norm over all layers, rows and tokens
    clean_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in clean_output_grads]))
    for layer, grad in enumerate(clean_output_grads):
        torch.testing.assert_close(eps[layer], rho * grad / clean_norm, rtol=1e-4, atol=1e-7)

    first, second = passes
    for layer in range(3):  # pass 1 untouched, pass 2 carries eps between attention and the residual add
        assert torch.equal(first[layer]["summed"], first[layer]["residual"] + first[layer]["raw"])
        torch.testing.assert_close(second[layer]["summed"] - second[layer]["residual"] - second[layer]["raw"],
                                   eps[layer], rtol=0, atol=1e-5)

    perturbed_loss = hooked_loss(model, batch, lambda i: lambda m, a, out: (out[0] + eps[i], *out[1:]))
    expected = torch.autograd.grad(perturbed_loss, params)
    torch.testing.assert_close(loss, perturbed_loss.detach())
    assert not torch.isclose(loss, clean_loss.detach(), rtol=1e-3)
    for grad, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(grad, clean, rtol=1e-2) for grad, clean in zip(seen, clean_param_grads, strict=True))
    assert not any(h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))  # all removed


def test_perturbation_is_the_scaled_gradient_with_one_global_norm():
    gradients = {0: torch.tensor([[3.0, 0.0]]), 4: torch.tensor([[0.0, 4.0]])}
    eps = vaccine.perturbations(gradients, rho=10.0)
    torch.testing.assert_close(eps[0], torch.tensor([[6.0, 0.0]]))
    torch.testing.assert_close(eps[4], torch.tensor([[0.0, 8.0]]))


def test_a_model_without_decoder_self_attention_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=258))
    with pytest.raises(AntidoteError, match="self_attn"):
        vaccine.attention_modules(model)


def test_align_with_vaccine_writes_a_loadable_adapter_and_names_the_defense(tmp_path):

    tokenizer = make_tokenizer()
    run = MethodRun(Vaccine.configure({}, preset="cpu"))
    result = training.align(make_model(), tokenizer, MEMO, tiny_config(max_steps=2), tmp_path / "vaccine", method=run,
                            progress=False)
    plain = training.align(make_model(), tokenizer, MEMO, tiny_config(max_steps=2), tmp_path / "sft", progress=False)

    report = json.loads((tmp_path / "vaccine" / "report.json").read_text())
    assert report["defense"]["name"] == "vaccine" and report["defense"]["settings"] == {"rho": 2.0}
    assert report["train"]["steps"] == 2
    saved_lora_b(result.adapter_dir)
    trained, baseline = adapter_tensors(result.adapter_dir), adapter_tensors(plain.adapter_dir)
    assert any(not torch.equal(trained[k], baseline[k]) for k in trained)  # the perturbation changed training
    with pytest.raises(AntidoteError, match="gradient accumulation 1"):
        training.align(make_model(), tokenizer, MEMO, tiny_config(gradient_accumulation=2), tmp_path / "ga",
                       method=run, progress=False)
