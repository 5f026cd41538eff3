"""Where rows come from and which of them to use: one spec for the CLI, the Python API and the lab."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from antidote_llm.data.records import PairSet, load_pairs

Safety = Literal["safe", "unsafe", "all"]


class DataSpec(BaseModel):
    """Rows of a file or hub dataset (`hf:NAME[:SPLIT]`); see `load_pairs` for the meaning of each field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="JSON, JSONL, CSV, TSV or Parquet file, or hf:NAME[:SPLIT]")
    prompt_field: str | None = Field(default=None, description="field holding the prompt (detected if omitted)")
    response_field: str | None = Field(default=None, description="field holding the answer (detected if omitted)")
    input_field: str | None = Field(default=None, description="field holding an optional input/context")
    category_field: str | None = Field(
        default=None, description="field holding a harmful prompt's category, reported per category (detected if "
        "omitted: category, SemanticCategory)")
    samples: int | None = Field(default=None, ge=1, description="rows to use (default: all)")
    skip: int = Field(default=0, ge=0, description="drop the first N rows (keep re-alignment rows disjoint from poison rows)")
    seed: int | None = Field(default=None, description="shuffle the rows with this seed before taking --samples")
    safety: Safety | None = Field(
        default=None, description="BeaverTails is_safe filter: safe, unsafe or all rows (default: the role's)"
    )

    def load(self, default_safety: Safety = "all", exclude: Sequence[int] = (), require_response: bool = True,
             name: str = "samples", categories: bool = False) -> PairSet:
        """The rows; `samples` more than there are is refused, naming `name` (the setting, e.g. realign_data.samples).
        With `categories` (harmful prompts that are reported per category), the category field is detected when
        not named."""
        safety = self.safety or default_safety
        return load_pairs(
            self.source, prompt_field=self.prompt_field, response_field=self.response_field,
            input_field=self.input_field, samples=self.samples, skip=self.skip, seed=self.seed,
            safety=None if safety == "all" else safety, exclude=exclude, require_response=require_response,
            name=name,
            category_field=self.category_field, categories=categories,
        )
