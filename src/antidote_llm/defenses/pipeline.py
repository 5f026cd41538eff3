"""The post-fine-tuning peers from disk to disk (`antidote realign --method safelora|resta|safe-delta`):
the inputs checked before any work, the fine-tuned model loaded with its adapter live, the defense applied,
the repaired adapter or model and report.json written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from antidote_llm.data.spec import DataSpec
from antidote_llm.defenses import DEFENSES
from antidote_llm.defenses.report import PostReport
from antidote_llm.errors import AntidoteError
from antidote_llm.registry import INPUTS, Defense, DefenseContext, input_spec
from antidote_llm.runtime.loading import ModelSource, load_model
from antidote_llm.runtime.outputs import output_run, save_model, write_report

REPORT_FILE = "report.json"
# The config keys of a model's shape: a reference model must agree on every one it has.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")
PeerInput = str | DataSpec  # a path (model, adapter) or rows, as the user gave them


def _default_inputs(defense: type[Defense]) -> tuple[tuple[str, ...], ...]:
    try:
        return defense.configure({}).inputs()
    except AntidoteError:  # a defense with a required setting (Antidote's ratio) is not a peer
        return ()


def peer_methods() -> tuple[str, ...]:
    """The post-fine-tuning peers `antidote realign --method` offers beside Antidote: the post-stage defenses whose
    inputs all come from the peers' flags. Antidote's variants read its own options (--data, --contrast-data) and
    guard has its own command."""
    def peer(defense: type[Defense]) -> bool:
        needed = {name for options in _default_inputs(defense) for name in options}
        return bool(needed) and all(input_spec(name).cli for name in needed)

    return tuple(name for name, d in DEFENSES.items() if d.stage == "post" and peer(d))


def _given(inputs: dict[str, PeerInput]) -> dict[str, str]:
    return {name: (value.source if isinstance(value, DataSpec) else value) for name, value in inputs.items()}


def _architecture(path: str) -> dict | None:
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    values = json.loads(config.read_text(encoding="utf-8"))
    return {key: values.get(key) for key in ARCHITECTURE_KEYS}


def check_inputs(chosen: Defense, source: ModelSource, inputs: dict[str, PeerInput]) -> None:
    """Refuse, before any model is loaded: a missing extra input (named by its flag), one the method does not
    use, a fine-tune that is not an adapter, and a reference model of another architecture."""
    method = chosen.name
    if not source.adapters:
        raise AntidoteError(f"{method} repairs a LoRA fine-tune: give the aligned model with --model and the "
                            "fine-tuning adapter with --adapter")
    given = _given(inputs)
    flag = {name: input_spec(name).flag for name in INPUTS}
    for options in chosen.inputs():
        if not any(name in given for name in options):
            raise AntidoteError(f"{method} needs {' or '.join(flag[name] for name in options)}")
        if sum(name in given for name in options) > 1:
            raise AntidoteError(f"{method} takes one of {', '.join(flag[name] for name in options)}, not both")
    used = {name for options in chosen.inputs() for name in options}
    for name in given:
        if name not in used:
            raise AntidoteError(f"{flag[name]} is not an input of {method}; remove it")
    for name, path in given.items():
        kind = input_spec(name).kind
        if kind == "adapter" and not Path(path).exists():
            raise AntidoteError(f"{flag[name]} {path} not found")
        if kind not in ("model", "adapter") or (Path(path) / "adapter_config.json").is_file():
            continue
        ours, theirs = _architecture(source.model), _architecture(path)
        if ours is not None and theirs is not None and ours != theirs:
            differ = [key for key in ARCHITECTURE_KEYS if ours[key] != theirs[key]]
            raise AntidoteError(f"{flag[name]} {path} is another architecture than --model ({', '.join(differ)} differ); "
                                "give the model of this aligned model's lineage")


def load_inputs(inputs: dict[str, PeerInput], like: ModelSource) -> dict:
    """The inputs as a defense reads them: rows loaded (filtered by the input's safety), models as sources. Rows
    whose count is not given take the input's default count (e.g. Safe Delta's 128) when there are that many, else
    all there are; a count given is taken exactly (more than there are is refused)."""
    loaded = {}
    for name, value in inputs.items():
        spec = input_spec(name)
        if spec.kind == "rows":
            rows = value.load(spec.safety, name=spec.samples_flag)
            loaded[name] = rows.head(spec.samples) if value.samples is None and spec.samples else rows
        elif spec.kind == "model":
            loaded[name] = ModelSource(value, dtype=like.dtype, device=like.device,
                                       trust_remote_code=like.trust_remote_code)
        else:
            loaded[name] = value
    return loaded


def defend_to_disk(
    chosen: Defense,
    source: ModelSource,
    out: str | Path,
    *,
    inputs: dict[str, PeerInput],
    save_merged: bool = False,
    overwrite: bool = False,
) -> PostReport:
    with output_run(out, overwrite=overwrite, inputs=[source.model, *source.adapters, *_given(inputs).values()]) as run:
        check_inputs(chosen, source, inputs)
        values = load_inputs(inputs, source)
        with run.timings.measure("load_s"):
            loaded = load_model(source, keep_adapter=True)
        context = DefenseContext(loaded.tokenizer, **values)
        with run.timings.measure("defense_s"):
            outcome = chosen.apply(loaded.model, context)
        report = PostReport.model_validate(outcome.report)
        outputs, _ = save_model(run.folder, loaded.model, loaded.tokenizer, run.timings,
                                adapter=report.output == "adapter", merged=save_merged, base=loaded.source)
        rows = {f"{name}_rows": len(value) for name, value in values.items() if input_spec(name).kind == "rows"}
        report = report.model_copy(update={
            **run.report_fields(), "model": source.describe(), "outputs": outputs,
            "inputs": {**_given(inputs), **rows}, "timings": {**report.timings, **run.timings},
        })
        write_report(run.folder / REPORT_FILE, report)
    return report
