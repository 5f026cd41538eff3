"""The Hugging Face Trainer plumbing every training stage shares: arguments, collator, the SFT trainer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from antidote_llm.training.config import TrainConfig

IGNORE_INDEX = -100


def supervised_collator(tokenizer):
    """Right-padded batches with labels padded by -100. The attention mask comes from row lengths
    (tokenizer.pad), not from the pad id: many tokenizers pad with their EOS, which also ends every answer."""
    from transformers import DataCollatorForSeq2Seq

    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True, return_tensors="pt")


def sft_trainer_class():
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class SFTTrainer(Trainer):
        """Rows grouped by length in batches of the *global* batch (per-device batch x accumulation x processes),
        from a generator seeded by the config: the same rows make each optimizer step however many processes
        share it (the Trainer's own sampler groups by the per-device batch and draws from the global RNG)."""

        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            args = self.args
            return LengthGroupedSampler(
                args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
                lengths=[len(item["input_ids"]) for item in dataset],
                generator=torch.Generator().manual_seed(args.seed),
            )

    return SFTTrainer


TENSORBOARD_DIR = "tensorboard"  # in a stage's folder: the events files of report_to tensorboard


def training_arguments(config: TrainConfig, output_dir: str, on_cpu: bool, progress: bool,
                       report_to: Sequence[str] = ()):
    """`report_to`: the Trainer integrations that get the loss curves (checked names, see `tracker_names`)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=config.weight_decay,
        optim="adamw_torch",
        seed=config.seed,
        logging_steps=config.logging_steps,
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        report_to=list(report_to) or "none",
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=on_cpu,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )


def log_tensorboard_to(trainer, folder: Path) -> None:
    """Send the trainer's TensorBoard events (when it reports to tensorboard) to `folder`, not to its scratch
    output_dir, so they stay with the stage's outputs."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(folder)
