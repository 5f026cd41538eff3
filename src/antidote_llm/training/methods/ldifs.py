"""LDIFS (Mukhoti et al., "Fine-tuning can cripple your foundation model; preserving features may be the
solution", TMLR 2024), as the Antidote paper adapts it to LLMs: an l2 penalty in feature space that keeps the
fine-tuned model's intermediate features on the user's batch close to those of the aligned model.

Each step runs the batch twice: once through the aligned model, which in the double-LoRA protocol is the same
PEFT model with its fresh fine-tuning adapter disabled (no second copy), under no_grad and in eval mode, with
the same autocast as the trained pass; then through the trained model. The loss gains
rho/2 * sum over decoder layers of ||mlp_out - mlp_out_aligned||^2, summed over the batch's real tokens
(attention mask) and features.

Differences from the authors' code (git-disl/Antidote trainer.py LDIFSTrainer):
- no deep copy of the model: the reference is the model itself with the adapter disabled;
- the reference pass runs under no_grad and eval mode with the trained pass's autocast; the authors' runs in
  fp32 outside autocast and keeps its graph, so the term is not zero at step 0 and the backward pass also
  runs through the copy;
- padding tokens do not count;
- no per-layer drop of terms >= 0.1 (the authors' NaN guard, which switches the penalty off for exactly the
  layers that drift most); `authors_threshold` restores it, on the masked terms of each process's batch;
- no inner clip_grad_norm_(5): the Trainer clips to max_grad_norm anyway;
- the sum runs over the optimizer step's whole batch: across processes (each process's term is scaled by the
  process count, since gradients are averaged) and across accumulated micro-batches (the Trainer normalises
  the cross-entropy over the accumulated batch for models taking loss kwargs, as Llama does).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from antidote_llm.registry import TrainingDefense, register
from antidote_llm.training.methods.base import (
    decoder_blocks,
    main_output,
    method_trainer_class,
)

AUTHORS_THRESHOLD = 0.1  # git-disl/Antidote trainer.py LDIFSTrainer: a layer's term is added only below this


PRESETS = {
    # git-disl/Antidote script/finetune/LDIFS_poison_ratio.sh:15 (RHO=0.0001), for Llama-2-7b.
    "paper": {"rho": 1e-4},
    # Measured on SmolLM2-135M (SST-2, lr 2e-3, one epoch; docs/results.md): the summed distance is ~1e6 after a few
    # steps, so rho 1e-4 and 1e-5 make the penalty 10-60x the cross-entropy and the task is not learned (FA 0
    # and 6 against 60 undefended); at 1e-6 the penalty is about the cross-entropy and the task is learned.
    "cpu": {"rho": 1e-6},
}


def mlp_modules(model) -> list[torch.nn.Module]:
    return decoder_blocks(model, "mlp", "ldifs")


def _trainer_class():
    class LdifsTrainer(method_trainer_class()):
        """The SFT trainer with LDIFS's feature-distance penalty to the aligned model."""

        def _aligned_features(self, peft_model, mlps, inputs) -> list[torch.Tensor]:
            """The aligned model's MLP outputs on the batch: the adapter off, no graph, eval mode."""
            features: dict[int, torch.Tensor] = {}

            def keep(index: int, output) -> None:
                features[index] = main_output(output).detach()

            hooks = [mlp.register_forward_hook(lambda _m, _a, output, index=index: keep(index, output))
                     for index, mlp in enumerate(mlps)]
            was_training = peft_model.training
            try:
                peft_model.eval()
                # peft_model.forward carries the accelerator's autocast, as the trained pass does.
                with torch.no_grad(), peft_model.disable_adapter():
                    peft_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               use_cache=False, logits_to_keep=1)  # only the features are needed
            finally:
                for hook in hooks:
                    hook.remove()
                peft_model.train(was_training)
            return [features[index] for index in range(len(mlps))]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            settings = self.method_settings
            peft_model = self.accelerator.unwrap_model(model)
            mlps = mlp_modules(peft_model)
            aligned = self._aligned_features(peft_model, mlps, inputs)
            mask = inputs["attention_mask"].unsqueeze(-1).to(torch.float32)
            terms: list[torch.Tensor] = []

            def add_term(index: int, output) -> None:
                distance = ((main_output(output).float() - aligned[index].float()) ** 2 * mask).sum()
                term = settings.rho / 2 * distance
                if not settings.authors_threshold or term.item() < AUTHORS_THRESHOLD:
                    terms.append(term)

            hooks = [mlp.register_forward_hook(lambda _m, _a, output, index=index: add_term(index, output))
                     for index, mlp in enumerate(mlps)]
            try:
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch)
            finally:
                for hook in hooks:
                    hook.remove()
            if terms:
                loss = loss + torch.stack(terms).sum() * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return LdifsTrainer


@register
class Ldifs(TrainingDefense):
    name: ClassVar[str] = "ldifs"
    stage: ClassVar[str] = "finetune"
    description: ClassVar[str] = "LDIFS: keep every decoder layer's MLP output on the user's batch close to the aligned model's"
    presets: ClassVar[dict] = PRESETS
    trainer_class: ClassVar = staticmethod(_trainer_class)

    rho: float = Field(..., gt=0, description="weight of the feature distance: rho/2 times the squared distance "
                                               "between the trained and aligned MLP outputs of every decoder layer, "
                                               "summed over the batch's tokens and features")
    authors_threshold: bool = Field(False, description="drop a layer's term once it reaches 0.1, as the authors' "
                                                        "code does (it switches off the layers that drift most)")
