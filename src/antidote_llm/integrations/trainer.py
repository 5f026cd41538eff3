"""`GuardCallback`: `antidote guard` at the end of a Hugging Face `Trainer` run (and TRL's `SFTTrainer`, a Trainer).

At `on_train_end` the trained weights (the LoRA adapter, or the whole model) are saved to
`output_dir/guard-input/`, guard decides on them from there exactly as `antidote guard` does (the same
`guard_to_disk`), and the verdict lands beside the checkpoints in `output_dir/guard/` (verdict.json, verdict.md,
the plots, and the repaired adapter with its model card when the verdict is repaired). With `fail_on_rejected`, a
rejected model raises `GuardRejected` after the verdict is written, so a pipeline stops there.

Everything guard reads is checked when the callback is built, and the output folders when training begins, so a
mistake stops the run before any training, not after it. Guard loads the trained weights again from disk (the
trainer's model is never changed); on a large model, that is a second copy in memory.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from antidote_llm.data.spec import DataSpec
from antidote_llm.errors import AntidoteError, validated
from antidote_llm.evaluation.settings import EvalSettings
from antidote_llm.frontier.disk import ProbeSpec, user_rows
from antidote_llm.frontier.guard import GuardSettings, split_settings
from antidote_llm.frontier.guard_disk import GuardReport, guard_to_disk
from antidote_llm.runtime.loading import ModelSource
from antidote_llm.runtime.outputs import atomic_dir, check_output_dir, save_model
from antidote_llm.runtime.runinfo import Timings

GUARD_DIR, INPUT_DIR = "guard", "guard-input"  # in the Trainer's output_dir: the verdict, the weights it judged


class GuardRejected(AntidoteError):
    """The trained model was rejected (fail_on_rejected); the verdict is written."""


class GuardCallback(TrainerCallback):
    """Run guard on the trained adapter or model when training ends and write the verdict beside the checkpoints.

    probe_prompts: harmful probe prompts (a file or hf:NAME[:SPLIT], or a DataSpec); task and validation_data: the
    user's task and validation rows (validation_samples / validation_skip choose them). data: the selection's
    calibration rows (refusals for the default refusal score, harmful rows for score wanda); contrast_data: the
    user's fine-tuning rows of `task`, which the refusal score weighs against. evaluation: the EvalSettings of the
    probe (judge, max_new_tokens, batch_size) as a dict or EvalSettings. Any other keyword is a setting of guard
    (GuardSettings: max_harmful, max_accuracy_drop, score, targets, template, ratios, controls, write_best, ...).
    out: where the verdict goes (default output_dir/guard); base_model: the model the adapter lies on (default: the
    adapter's own base_model_name_or_path); tokenizer: saved with a whole model when the trainer has none.
    """

    def __init__(self, *, probe_prompts: str | DataSpec | None = None, task: str | None = None,
                 validation_data: str | None = None, validation_samples: int | None = None, validation_skip: int = 0,
                 data: str | DataSpec | None = None, contrast_data: str | None = None,
                 contrast_samples: int | None = None, contrast_skip: int = 0,
                 evaluation: EvalSettings | dict | None = None, out: str | Path | None = None,
                 fail_on_rejected: bool = False, base_model: str | None = None, tokenizer=None,
                 save_merged: bool = False, overwrite: bool = False, device: str = "auto", dtype: str = "auto",
                 progress: bool = False, **settings):
        if not probe_prompts or not task or not validation_data:
            raise AntidoteError("GuardCallback decides on probe prompts and the user's validation rows: give "
                                "probe_prompts=, task= and validation_data=")
        self.selection, self.decision = split_settings(validated(GuardSettings, settings))
        evaluation = evaluation if isinstance(evaluation, EvalSettings) else validated(EvalSettings, evaluation or {})
        prompts = probe_prompts if isinstance(probe_prompts, DataSpec) else DataSpec(source=str(probe_prompts))
        self.probe = ProbeSpec(prompts=prompts, task=task, validation=validation_data,
                               validation_samples=validation_samples, validation_skip=validation_skip,
                               settings=evaluation)
        self.data = data if isinstance(data, DataSpec) or data is None else DataSpec(source=str(data))
        if self.data is None and self.selection.needs_data:
            raise AntidoteError(f"score {self.selection.score} scores on calibration rows: give GuardCallback data= "
                                "(refusals for score refusal, harmful rows for score wanda)")
        if self.selection.score == "refusal" and not contrast_data:
            raise AntidoteError("score refusal weighs the refusals against the user's own rows: give GuardCallback "
                                "contrast_data= (the fine-tuning rows of the task)")
        # read every row set now: a bad file or field stops the run before training, not after it
        self.probe.load(self.selection.template)
        if self.data is not None:
            self.data.load("safe" if self.selection.score == "refusal" else "unsafe")
        self.contrast = user_rows(task, contrast_data, contrast_samples, contrast_skip) if contrast_data else None
        self.out, self.fail_on_rejected, self.base_model = out, fail_on_rejected, base_model
        self.tokenizer, self.save_merged, self.overwrite = tokenizer, save_merged, overwrite
        self.device, self.dtype, self.progress = device, dtype, progress
        self.report: GuardReport | None = None  # the verdict, once training has ended

    def folders(self, output_dir: str) -> tuple[Path, Path]:
        """(where the verdict goes, where the trained weights are saved for guard to read)."""
        return Path(self.out) if self.out is not None else Path(output_dir) / GUARD_DIR, Path(output_dir) / INPUT_DIR

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            for folder in self.folders(args.output_dir):
                check_output_dir(folder, overwrite=self.overwrite)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:  # one process decides
            return
        if model is None:
            raise AntidoteError("GuardCallback got no model at the end of training; add it to a Trainer")
        out, inputs = self.folders(args.output_dir)
        source = self._save_trained(model, self.tokenizer or processing_class, inputs)
        self.report = guard_to_disk(source, self.selection, self.decision, out, data=self.data, probe=self.probe,
                                    contrast_data=self.contrast, save_merged=self.save_merged,
                                    overwrite=self.overwrite, progress=self.progress)
        print(f"GuardCallback: {self.report.verdict.upper()}: {self.report.reason}; the verdict is in {out}")
        if self.fail_on_rejected and self.report.verdict == "rejected":
            raise GuardRejected(f"guard rejected the trained model: {self.report.reason}; the verdict is in "
                                f"{out / 'verdict.md'}")

    def _save_trained(self, model, tokenizer, folder: Path) -> ModelSource:
        """The trained weights on disk (adapter/ for a LoRA, model/ for a whole model), as a source guard loads."""
        adapter = hasattr(model, "peft_config")
        if adapter:
            base = self.base_model or model.peft_config[model.active_adapter].base_model_name_or_path
            if not base:
                raise AntidoteError("the trained adapter does not name its base model; give GuardCallback "
                                    "base_model=")
        elif tokenizer is None:
            raise AntidoteError("a whole model is saved with its tokenizer: give the Trainer a processing_class or "
                                "GuardCallback tokenizer=")
        with atomic_dir(folder, replace=self.overwrite) as tmp:
            save_model(tmp, model, tokenizer, Timings(), adapter=adapter)
        if adapter:
            return ModelSource(str(base), adapters=(str(folder / "adapter"),), dtype=self.dtype, device=self.device)
        return ModelSource(str(folder / "model"), dtype=self.dtype, device=self.device)
