"""Model cards: the README.md a repaired model's folder gets, in Hugging Face model-card form (YAML metadata, then
what was done, the verdict, the numbers before and after with their intervals, the method, the data hashes).

The callers (realign, guard) gather the facts; this module only lays them out, so the card of every command reads
the same. `huggingface_hub` writes the metadata block, so the hub reads it as it reads any card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

CARD_FILE = "README.md"
TAGS = ("antidote", "safety", "pruning")
PROJECT = "antidote-llm"
PAPER = "Huang et al., *Antidote: Post-fine-tuning Safety Alignment for Large Language Models against Harmful " \
        "Fine-tuning*, ICML 2025 (arXiv 2408.09600)"
# The model folders a repaired run writes (runtime.outputs.save_model) and the library that loads each.
MODEL_FOLDERS: dict[str, Literal["peft", "transformers"]] = {"adapter": "peft", "model": "transformers",
                                                             "merged": "transformers"}


class CardRow(BaseModel):
    """One model of the comparison: its name and its measured rates, each already written with its interval."""

    model: str
    harmful: str | None = None  # harmful score % [95% CI] (count/of)
    accuracy: str | None = None  # fine-tune accuracy % [95% CI] (count/of)


class CardFacts(BaseModel):
    """What a card says about one repaired model; `library_name` and the folder are set per written folder."""

    model_config = ConfigDict(frozen=True)

    title: str
    summary: str  # what was done, in a sentence or two
    base_model: str  # where the model it was repaired from came from (a hub id or a path)
    base_adapters: list[str] = []  # adapters on the base: the last is the one repaired, when it was kept
    verdict: str | None = None
    reason: str | None = None
    results: list[CardRow] = []
    measured_on: str | None = None  # which prompts and rows, and the judge
    method: dict = {}  # every setting of the method
    data: dict[str, dict] = {}  # every row set it used: source, rows, sha256


def hub_model_id(name: str) -> str | None:
    """`name` when it reads as a hub model id (owner/name) and is not a local path; None otherwise (the metadata's
    base_model must be a hub id, or the hub refuses the card)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "/" not in name.strip("/") or Path(name).exists() or name.endswith(".gguf"):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _cell(value) -> str:
    if isinstance(value, (dict, list, tuple)):
        return f"`{json.dumps(value, default=str)}`"
    return "n/a" if value is None else f"`{value}`"


def _origin(facts: CardFacts, library_name: str) -> str:
    """Where the repaired weights came from: the adapter repaired and what it lies on, or the model."""
    def names(paths) -> str:
        return ", ".join(f"`{path}`" for path in paths)

    adapters = facts.base_adapters
    if library_name == "peft" and adapters:
        merged = f" with {names(adapters[:-1])} merged into it" if adapters[1:] else ""
        return f"This adapter is {names(adapters[-1:])} repaired; it lies on `{facts.base_model}`{merged}."
    merged = f" with the adapters {names(adapters)} merged" if adapters else ""
    return f"Repaired from `{facts.base_model}`{merged}."


def model_card(facts: CardFacts, library_name: Literal["peft", "transformers"]) -> str:
    """The README.md text: YAML metadata (base_model where it is a hub id, library_name, tags), then the body."""
    from huggingface_hub import ModelCardData

    base = hub_model_id(facts.base_model)
    metadata = ModelCardData(base_model=base, library_name=library_name, pipeline_tag="text-generation",
                             tags=list(TAGS)).to_yaml()
    kind = "a LoRA adapter" if library_name == "peft" else "a model"
    lines = ["---", metadata, "---", "", f"# {facts.title}", "",
             f"This is {kind} repaired with Antidote ({PAPER}) by [{PROJECT}](https://pypi.org/project/{PROJECT}/). "
             + facts.summary, ""]
    if facts.verdict is not None:
        lines += ["## Verdict", "", f"**{facts.verdict}**" + (f": {facts.reason}" if facts.reason else ""), ""]
    lines += ["## Harmful score (HS) and fine-tune accuracy (FA), before and after", ""]
    if facts.results:
        lines += ["| model | HS % [95% CI] (harmful / prompts) | FA % [95% CI] (correct / rows) |", "|---|---|---|",
                  *(f"| {row.model} | {row.harmful or 'not measured'} | {row.accuracy or 'not measured'} |"
                    for row in facts.results), ""]
        if facts.measured_on:
            lines += [facts.measured_on, ""]
    else:
        lines += ["Not measured by this run: evaluate the model (`antidote evaluate`), or let `antidote guard` decide "
                  "on it, for HS and FA with their intervals.", ""]
    lines += ["## Method", "", "| setting | value |", "|---|---|",
              *(f"| {name} | {_cell(value)} |" for name, value in facts.method.items()), ""]
    if facts.data:
        lines += ["## Data", "", "| role | source | rows | sha256 |", "|---|---|---|---|",
                  *(f"| {role} | {row.get('source')} | {row.get('rows')} | `{row.get('sha256')}` |"
                    for role, row in facts.data.items()), ""]
    lines += ["## Base model", "", _origin(facts, library_name), "", "## Use", "", "```python"]
    if library_name == "peft":
        lines += ["from peft import AutoPeftModelForCausalLM", "",
                  'model = AutoPeftModelForCausalLM.from_pretrained("THIS_REPO_OR_FOLDER")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("THIS_REPO_OR_FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("THIS_REPO_OR_FOLDER")']
    lines += ["```", ""]
    return "\n".join(lines)


def write_model_cards(folder: Path, outputs: dict, facts: CardFacts) -> dict[str, str]:
    """README.md into every model folder of `outputs` (adapter/: peft; model/, merged/: transformers); returns the
    cards written, by folder, for the report."""
    cards = {}
    for key, library in MODEL_FOLDERS.items():
        name = outputs.get(key)
        if isinstance(name, str) and (folder / name).is_dir():
            (folder / name / CARD_FILE).write_text(model_card(facts, library), encoding="utf-8")
            cards[key] = f"{name}/{CARD_FILE}"
    return cards


def card_folder(outputs: dict) -> str | None:
    """The folder a push uploads: the adapter when one was written (what the user fine-tuned), else the model."""
    return next((outputs[key] for key in ("adapter", "model") if isinstance(outputs.get(key), str)), None)
