"""The training stages before Antidote: safety alignment and the user's (possibly poisoned) fine-tuning."""

from antidote_llm.data.mix import MixSpec, build_mix, check_mix_counts, mix_spec
from antidote_llm.training.config import PRESETS, Stage, TrainConfig, preset
from antidote_llm.training.sft import (
    FinetuneResult,
    TrainResult,
    align,
    encode_example,
    encode_rows,
    finetune,
    unalign,
)

__all__ = [
    "PRESETS", "FinetuneResult", "MixSpec", "Stage", "TrainConfig", "TrainResult", "align", "build_mix",
    "check_mix_counts", "encode_example", "encode_rows", "finetune", "mix_spec", "preset", "unalign",
]
