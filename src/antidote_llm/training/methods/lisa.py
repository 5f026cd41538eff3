"""Lisa (Huang et al., "Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning",
arXiv 2405.18641): bi-state optimisation during the user's fine-tuning.

The provider alternates K_a optimizer steps on alignment ("guide") rows, harmful prompts with safe answers,
with K_f steps on the user's rows, starting with the alignment state; during an alignment step the user's batch
is dropped. After the first 10 % of the optimizer steps each step also pays a proximal term
rho/2 * ||w - w_entry||^2, where w_entry are the trainable weights when the current state was entered (the
last iterate of the other state), so neither objective drags the weights far from where the other left them.

Differences from the authors' code (git-disl/Antidote trainer.py ADMMTrainer, git-disl/Lisa LisaTrainer):
- the schedule follows the Trainer's optimizer-step counter (global_step) rather than a micro-step counter of
  its own; with gradient accumulation 1, which the method requires as the authors ran it, the two coincide;
- one anchor copy instead of two: the authors keep an anchor per state, but each state only ever reads the
  anchor written when it was entered, so a single copy refreshed at every switch gives the same term;
- the 10 % threshold uses the Trainer's total step count (state.max_steps) instead of rebuilding the train
  dataloader every step to take its length (which also leaks prepared dataloaders in accelerate);
- the proximal term is a plain sum of squares, not torch.norm(...) ** 2, whose gradient is undefined at the
  anchor itself (the first step of every state);
- a guide batch's loss is normalised by its own answer-token count across processes, as the Trainer does for
  the user's batches, so a multi-process run takes the same steps as one process with the global batch.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from antidote_llm.registry import TrainingDefense, register
from antidote_llm.training.methods.base import method_trainer_class

# Share of the optimizer steps run without the proximal term (the authors' code: "we observe that for GSM8K,
# proximal term will hurt convergence. Don't do proximal for the first few rounds").
PROXIMAL_WARMUP = 0.1


PRESETS = {
    # git-disl/Antidote script/finetune/lisa_poison_ratio.sh:16 (rho=1), :20 (align_step=100),
    # :21 (finetune_step=900): with 5000 rows, batch 5 and 20 epochs, one 1000-step cycle per epoch.
    "paper": {"rho": 1.0, "align_steps": 100, "finetune_steps": 900},
    # The same shape on ~32 optimizer steps per epoch: a 30-step cycle, 10 % of it alignment.
    "cpu": {"rho": 1.0, "align_steps": 3, "finetune_steps": 27},
}


def _trainer_class():
    class LisaTrainer(method_trainer_class()):
        """The SFT trainer with Lisa's alternating states and proximal term."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._aligning: bool | None = None  # the current state; None before the first step
            self._anchor: list = []  # (parameter, its value when the current state was entered)
            self._proximal = False

        def _state_at(self, step: int) -> bool:
            """Whether optimizer step `step` (0-based) is an alignment step: cycles of K_a then K_f steps."""
            settings = self.method_settings
            return step % (settings.align_steps + settings.finetune_steps) < settings.align_steps

        def training_step(self, model, inputs, num_items_in_batch=None):
            step = self.state.global_step
            aligning = self._state_at(step)
            if aligning != self._aligning:
                self._aligning = aligning
                self._anchor = [(p, p.detach().clone()) for p in self.trainable_parameters()]
            self._proximal = self.method_settings.rho > 0 and step > PROXIMAL_WARMUP * self.state.max_steps
            if aligning:
                inputs = self.extra_batch("defense_guide")
                # The Trainer counted the dropped user batch's answer tokens; count the guide batch's instead.
                num_items_in_batch = self._get_num_items_in_batch([inputs], inputs["input_ids"].device)
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if self._proximal and model.training:
                distance = sum(((p - anchor) ** 2).sum() for p, anchor in self._anchor)
                loss = loss + self.method_settings.rho / 2 * distance
            return (loss, outputs) if return_outputs else loss

    return LisaTrainer


@register
class Lisa(TrainingDefense):
    name: ClassVar[str] = "lisa"
    stage: ClassVar[str] = "finetune"
    description: ClassVar[str] = "Lisa: alternate alignment steps on guide rows with the user's steps, a proximal term between them"
    presets: ClassVar[dict] = PRESETS
    trainer_class: ClassVar = staticmethod(_trainer_class)
    reads: ClassVar[tuple] = (("defense_guide",),)
    single_accumulation: ClassVar[bool] = True

    rho: float = Field(..., ge=0, description="weight of the proximal term rho/2 ||w - w_entry||^2 pulling each "
                                               "state toward the weights it started from (0: none)")
    align_steps: int = Field(..., ge=0, description="K_a: optimizer steps on the guide rows per cycle, run first "
                                                     "(0: plain fine-tuning with the proximal term)")
    finetune_steps: int = Field(..., ge=1, description="K_f: optimizer steps on the user's rows per cycle")
