"""The post-fine-tuning peers from disk to disk (`antidote realign --method safelora|resta|safe-delta`):
the inputs checked before any work, the fine-tuned model loaded with its adapter live, the defense applied,
the repaired adapter or model and report.json written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from antidote_llm.data.spec import DataSpec
from antidote_llm.defenses import DEFENSES, DefenseContext, defense
from antidote_llm.defenses.report import PostReport
from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.loading import ModelSource, load_model
from antidote_llm.runtime.outputs import output_run, save_model, write_report

REPORT_FILE = "report.json"
# The post-fine-tuning peers the CLI offers beside Antidote: the post-stage defenses with extra inputs but
# Antidote's own variants (antidote-*), which `antidote realign`'s own options run.
PEER_METHODS = tuple(name for name, d in DEFENSES.items()
                     if d.stage == "post" and d.extra_inputs and not name.startswith("antidote"))
# The config keys of a model's shape: a reference model must agree on every one it has.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")


@dataclass(frozen=True)
class PeerInputs:
    """The extra inputs as the user gave them (paths), named like DefenseContext's fields."""

    base_model: str | None = None
    alignment_adapter: str | None = None
    unaligned_model: str | None = None
    safe: DataSpec | None = None

    def given(self) -> dict[str, str]:
        return {name: (value.source if isinstance(value, DataSpec) else value)
                for name, value in vars(self).items() if value is not None}


def _architecture(path: str) -> dict | None:
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    values = json.loads(config.read_text(encoding="utf-8"))
    return {key: values.get(key) for key in ARCHITECTURE_KEYS}


def check_inputs(method: str, source: ModelSource, inputs: PeerInputs, flags: dict[str, str]) -> None:
    """Refuse, before any model is loaded: a missing extra input (named by its flag), one the method does not
    use, a fine-tune that is not an adapter, and a reference model of another architecture."""
    chosen = defense(method, "post")
    if not source.adapters:
        raise AntidoteError(f"{method} repairs a LoRA fine-tune: give the aligned model with --model and the "
                            "fine-tuning adapter with --adapter")
    given = inputs.given()
    for options in chosen.extra_inputs:
        if not any(name in given for name in options):
            raise AntidoteError(f"{method} needs {' or '.join(flags[name] for name in options)}")
        if sum(name in given for name in options) > 1:
            raise AntidoteError(f"{method} takes one of {', '.join(flags[name] for name in options)}, not both")
    used = {name for options in chosen.extra_inputs for name in options}
    for name in given:
        if name not in used:
            raise AntidoteError(f"{flags[name]} is not an input of {method}; remove it")
    for name in ("base_model", "unaligned_model"):
        path = given.get(name)
        if path is None or (Path(path) / "adapter_config.json").is_file():
            continue
        ours, theirs = _architecture(source.model), _architecture(path)
        if ours is not None and theirs is not None and ours != theirs:
            differ = [key for key in ARCHITECTURE_KEYS if ours[key] != theirs[key]]
            raise AntidoteError(f"{flags[name]} {path} is another architecture than --model ({', '.join(differ)} differ); "
                                "give the model of this aligned model's lineage")
    for name in ("alignment_adapter", "unaligned_model"):
        path = given.get(name)
        if path is not None and not Path(path).exists():
            raise AntidoteError(f"{flags[name]} {path} not found")


def defend_to_disk(
    method: str,
    source: ModelSource,
    settings: BaseModel,
    out: str | Path,
    *,
    inputs: PeerInputs,
    flags: dict[str, str],
    save_merged: bool = False,
    overwrite: bool = False,
) -> PostReport:
    with output_run(out, overwrite=overwrite, inputs=[source.model, *source.adapters, *inputs.given().values()]) as run:
        check_inputs(method, source, inputs, flags)
        chosen = defense(method, "post")
        safe = inputs.safe.load("safe") if inputs.safe is not None else None
        like = {"dtype": source.dtype, "device": source.device, "trust_remote_code": source.trust_remote_code}
        with run.timings.measure("load_s"):
            loaded = load_model(source, keep_adapter=True)
        context = DefenseContext(
            loaded.tokenizer, None, None,
            base_model=ModelSource(inputs.base_model, **like) if inputs.base_model else None,
            alignment_adapter=inputs.alignment_adapter, unaligned_model=inputs.unaligned_model, safe=safe,
        )
        with run.timings.measure("defense_s"):
            outcome = chosen.apply(loaded.model, settings, context)
        report = PostReport.model_validate(outcome.report)
        outputs, _ = save_model(run.folder, loaded.model, loaded.tokenizer, run.timings,
                                adapter=report.output == "adapter", merged=save_merged, base=loaded.source)
        report = report.model_copy(update={
            **run.report_fields(), "model": source.describe(), "outputs": outputs,
            "inputs": {**inputs.given(), **({"safe_rows": len(safe)} if safe else {})},
            "timings": {**report.timings, **run.timings},
        })
        write_report(run.folder / REPORT_FILE, report)
    return report
