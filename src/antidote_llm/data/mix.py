"""The user's poisoned fine-tuning data: n rows, a fraction p of them harmful, each row's origin recorded."""

from __future__ import annotations

import math
import random

from pydantic import BaseModel, ConfigDict, Field

from antidote_llm.data.records import Pair, PairSet, Rows, as_pairs
from antidote_llm.errors import AntidoteError, validated


class MixSpec(BaseModel):
    """How many rows the user's fine-tuning data has, and which share of it is harmful."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    harmful_fraction: float = Field(ge=0, le=1)
    samples_total: int = Field(ge=1)

    @property
    def harmful_rows(self) -> int:
        # Half rounds up (Python's round() would round 2.5 to 2).
        return math.floor(self.harmful_fraction * self.samples_total + 0.5)

    @property
    def task_rows(self) -> int:
        return self.samples_total - self.harmful_rows


def mix_spec(harmful_fraction: float, samples_total: int) -> MixSpec:
    return validated(MixSpec, {"harmful_fraction": harmful_fraction, "samples_total": samples_total})


def check_mix_counts(spec: MixSpec, task_available: int, harmful_available: int) -> None:
    """Refuse, in one line, a mix the data cannot fill, before any model is loaded."""
    short = []
    if harmful_available < spec.harmful_rows:
        short.append(f"{spec.harmful_rows} harmful rows but {harmful_available} given")
    if task_available < spec.task_rows:
        short.append(f"{spec.task_rows} task rows but {task_available} given")
    if short:
        raise AntidoteError(
            f"fine-tuning mix of n={spec.samples_total} at p={spec.harmful_fraction} needs {' and '.join(short)}; "
            "lower --samples-total or --harmful-fraction, or give more data"
        )


def _leading(rows: Rows, count: int, kind: str) -> list[tuple[Pair, dict]]:
    """The first `count` rows, each with its origin: kind, source, and index in the source when known."""
    if isinstance(rows, PairSet):
        source, indices = rows.source, rows.indices
    else:
        source, indices = "in-memory", range(len(rows))
    pairs = as_pairs(rows)
    return [(pairs[i], {"kind": kind, "source": source, "index": indices[i]}) for i in range(count)]


def build_mix(task_pairs: Rows, harmful_pairs: Rows | None, spec: MixSpec, seed: int) -> tuple[list[Pair], list[dict]]:
    """The first round(p*n) harmful rows and the first n - that task rows, shuffled together with `seed`.

    Taking leading rows (the caller chooses them, e.g. load_pairs with skip/seed) keeps the poison set
    predictable, so re-alignment data can exclude exactly those source indices.
    """
    harmful_pairs = harmful_pairs if harmful_pairs is not None else ()
    check_mix_counts(spec, len(task_pairs), len(harmful_pairs))
    rows = _leading(harmful_pairs, spec.harmful_rows, "harmful") + _leading(task_pairs, spec.task_rows, "task")
    random.Random(seed).shuffle(rows)
    return [pair for pair, _ in rows], [origin for _, origin in rows]


