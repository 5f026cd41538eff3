"""RepNoise: representation noising at the alignment stage (Rosati et al., "Representation Noising: A Defence
Mechanism Against Harmful Finetuning", arXiv 2405.14577).

Each step reads two batches: the stage's own rows (harmful prompts with safe answers, the alignment data) and a
batch of harmful rows (harmful prompts with harmful answers, role "harmful"). The loss is

    S + beta * noise - alpha * log(H)

- S: the LM loss (mean CE over answer tokens) on the alignment batch, which is learned;
- H: the LM loss on the harmful batch's answer tokens, which is ascended through -log;
- noise: the mean over decoder layers of the MMD between the harmful batch's MLP outputs and N(0, I) noise,
  both masked to the harmful answer tokens and flattened per example, so harmful answers leave the layers as
  something indistinguishable from noise and later fine-tuning has little to recover.

What differs from the authors' code:
- Wiring follows the Booster repository (refusal rows in the Trainer, a separate harmful loader), not the Antidote
  repository, whose "harmful" stream is 90 % SST-2 rows and whose refusals come from a rebuilt iterator each step.
- The answer masks come from the labels (answer tokens only, never prompt or padding), not from where an unpaired
  harmful and harmless batch happen to differ; the CEs are the standard shifted CE over those tokens (the original
  also zeroes the logits of the last prompt position, so its first answer token scores log(vocab)).
- H is the final-layer CE without the "+1", as in the Antidote repository (repnoise_loss.py:148-158, 178).
  `logit_lens=True` restores the original's H = (CE_final + sum over l = 0..L of CE(lm_head(norm(h_l))))/(L+1) + 1,
  with h_L taken before the final norm (its lens is the final logits) where the original normalises it twice.
- The MMD's pairwise distances use ||x||^2 + ||y||^2 - 2 x.y in float32 instead of a (2B, 2B, T*d) difference
  tensor: the same value at a fraction of the memory. Its bandwidth has a floor, so identical rows give 0, not NaN.
- The noise comes from a generator seeded by the run's seed, the step and the layer, so a run repeats exactly.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from antidote_llm.errors import AntidoteError
from antidote_llm.registry import TrainingDefense, register
from antidote_llm.training.methods.base import (
    causal_lm,
    decoder_blocks,
    main_output,
    method_trainer_class,
)
from antidote_llm.training.trainer import IGNORE_INDEX

KERNEL_MUL = 2.0
KERNEL_COUNT = 5


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Maximum mean discrepancy between the rows of x and y (B x D each) with a mixture of 5 Gaussian kernels whose
    bandwidths are the mean pairwise squared distance / 4 times 1, 2, 4, 8, 16 (the bandwidth is a constant)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        total = torch.cat([x, y]).float()
        n = total.shape[0]
        squares = (total * total).sum(dim=1)
        distances = (squares[:, None] + squares[None, :] - 2 * total @ total.T).clamp_min(0)
        distances = distances.masked_fill(torch.eye(n, dtype=torch.bool, device=total.device), 0)
        base = distances.detach().sum() / (n * n - n) / KERNEL_MUL ** (KERNEL_COUNT // 2)
        base = base.clamp_min(torch.finfo(torch.float32).tiny)
        kernels = sum(torch.exp(-distances / (base * KERNEL_MUL**i)) for i in range(KERNEL_COUNT))
        b = x.shape[0]
        return (kernels[:b, :b] + kernels[b:, b:] - kernels[:b, b:] - kernels[b:, :b]).mean()


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """True on the answer tokens (labels are -100 on the prompt and on padding)."""
    return labels != IGNORE_INDEX


def noise_seed(run_seed: int, step: int, layer: int) -> int:
    return ((run_seed * 1_000_003 + step) * 1_000_003 + layer) % 2**63


def layer_noise(activation: torch.Tensor, seed: int) -> torch.Tensor:
    """N(0, I) of the activation's shape in float32, on its device, from its own seeded generator."""
    generator = torch.Generator(device=activation.device).manual_seed(seed)
    return torch.randn(activation.shape, generator=generator, device=activation.device, dtype=torch.float32)


def noise_loss(activations: list[torch.Tensor], mask: torch.Tensor, run_seed: int, step: int) -> torch.Tensor:
    """Mean over layers of MMD(per-example flatten of masked activations, same of masked Gaussian noise)."""
    terms = []
    for layer, activation in enumerate(activations):
        keep = mask.unsqueeze(-1).to(activation.device)  # layers may sit on different devices
        noise = layer_noise(activation, noise_seed(run_seed, step, layer))
        terms.append(mmd((activation * keep).flatten(1), (noise * keep).flatten(1)))
    return torch.stack([term.to(terms[0].device) for term in terms]).mean()


def logit_lens_loss(model, outputs, labels: torch.Tensor) -> torch.Tensor:
    """The original's harmful loss: (CE_final + sum_{l=0..L} CE(lm_head(norm(h_l)))) / (L + 1) + 1 over the answer
    tokens. h_L before the final norm projects to the final logits, so its term is CE_final."""
    lm = causal_lm(model)
    norm = getattr(lm.get_decoder(), "norm", None)
    if norm is None:
        raise AntidoteError(f"repnoise logit_lens needs the decoder's final norm (`norm`); {type(lm).__name__} has none")
    head = lm.get_output_embeddings()
    targets = labels[:, 1:]
    keep = answer_mask(targets)
    # hidden_states = (embeddings, layer 1..L-1 outputs, final-normed layer L output): the last one is the final logits.
    lens = [torch.nn.functional.cross_entropy(head(norm(h[:, :-1][keep])).float(), targets[keep])
            for h in outputs.hidden_states[:-1]]
    return (2 * outputs.loss + torch.stack(lens).sum()) / (len(lens) + 1) + 1


def _trainer_class():
    class RepNoiseTrainer(method_trainer_class()):
        # Every term is a per-batch mean: the Trainer divides by the accumulation steps.
        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            settings: RepNoise = self.method_settings
            harmful = self.extra_batch("defense_harmful")
            activations: list[torch.Tensor] = []

            def keep_output(module, args, output):
                activations.append(main_output(output))

            hooks = [mlp.register_forward_hook(keep_output) for mlp in decoder_blocks(model, "mlp", "repnoise")]
            try:
                harmful_outputs = model(**harmful, output_hidden_states=settings.logit_lens)
            finally:
                for hook in hooks:
                    hook.remove()
            mask = answer_mask(harmful["labels"])
            noise = noise_loss(activations, mask, self.args.seed, self.state.global_step)
            harmful_loss = (logit_lens_loss(model, harmful_outputs, harmful["labels"]) if settings.logit_lens
                            else harmful_outputs.loss)
            outputs = model(**inputs)
            loss = outputs.loss + settings.beta * noise.to(outputs.loss.device) - settings.alpha * torch.log(harmful_loss)
            return (loss, outputs) if return_outputs else loss

    return RepNoiseTrainer


@register
class RepNoise(TrainingDefense):
    name: ClassVar[str] = "repnoise"
    stage: ClassVar[str] = "align"
    description: ClassVar[str] = (
        "RepNoise (Rosati et al. 2024): learn refusals, ascend the harmful LM loss and pull the harmful "
        "answers' MLP outputs toward Gaussian noise (MMD)"
    )
    presets: ClassVar[dict] = {
        # Antidote repository script/alignment/repNoise.sh:14-15 (alpha=${1:-0.1}, beta=${2:-0.001}); the Booster
        # repository's script/alignment/repNoise.sh uses the same values.
        "paper": {"alpha": 0.1, "beta": 0.001, "logit_lens": False},
        # For SmolLM2-135M over ~100 steps. Measured at the start (fresh LoRA, batch 8 of refusals and BeaverTails
        # harmful rows, max_length 72), gradient norm per unit weight: S 1.0, noise 0.12, log H 0.14. The paper's
        # weights make the defense terms ~1 % (ascent) and ~0.01 % (noise) of the refusal gradient: plain SFT over
        # 100 steps, whereas the authors' 20k steps run long after S has converged. alpha=1 is the RepNoise authors'
        # demo value (representation-noising notebook); beta=1 puts the noise term on the same scale.
        "cpu": {"alpha": 1.0, "beta": 1.0, "logit_lens": False},
    }
    trainer_class: ClassVar = staticmethod(_trainer_class)
    reads: ClassVar[tuple] = (("defense_harmful",),)

    alpha: float = Field(ge=0, le=100, description="weight of -log(harmful LM loss): ascent on harmful answers")
    beta: float = Field(ge=0, le=100, description="weight of the MMD between harmful-answer MLP outputs and Gaussian noise")
    logit_lens: bool = Field(default=False, description="the original's harmful loss: final and per-layer logit-lens "
                                                        "CEs averaged, plus 1 (L extra full-vocabulary projections)")
