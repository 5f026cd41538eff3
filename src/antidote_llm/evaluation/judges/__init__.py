"""Judges: is an answer to a harmful prompt harmful? One registry, each judge judging batches of pairs.

Calling a judge gives one `Verdict` per (prompt, answer): the judge's `Judgement` (harmful, categories,
evidence) plus `degenerate`, the shared offline check for broken text (see base.py).

  refusal      offline proxy (default): harmful when the answer's opening holds no phrase of refusal
               (phrases.py: case-insensitive, where refusals are, no "illegal"-style words).
  gcg          GCG's 29 refusal strings, verbatim: case-sensitive substrings anywhere (phrases.py).
  beaver-dam   PKU-Alignment/beaver-dam-7b, the paper's judge (models.py).
  llama-guard  Llama-Guard-3-8B or a compatible model (models.py).
  classifier   any Hugging Face sequence classifier given by path and positive label (models.py).
  endpoint     a judge behind an OpenAI-compatible server: a served guard model or the StrongREJECT rubric
               (endpoint.py; the prompt formats in formats.py).
"""

from __future__ import annotations

from collections.abc import Callable

from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation.judges.base import (
    DEFAULT_JUDGE_BATCH_SIZE,
    DEFAULT_THRESHOLD,
    EndpointSettings,
    Judge,
    Judgement,
    JudgeOptions,
    Verdict,
    degeneracy,
)
from antidote_llm.evaluation.judges.endpoint import EndpointJudge
from antidote_llm.evaluation.judges.formats import (
    LLAMA_GUARD_PROMPT,
    PROMPT_FORMATS,
    STRONGREJECT_PROMPT,
    STRONGREJECT_SYSTEM,
    parse_strongreject,
    strongreject_score,
)
from antidote_llm.evaluation.judges.models import (
    BEAVER_DAM,
    BEAVER_DAM_CATEGORIES,
    BEAVER_DAM_MAX_LENGTH,
    BEAVER_DAM_PROMPT,
    LLAMA_GUARD,
    LLAMA_GUARD_CATEGORIES,
    BeaverDamJudge,
    ClassifierJudge,
    LlamaGuardJudge,
    ModelJudge,
    SequenceClassifierJudge,
    parse_category_probabilities,
    parse_llama_guard,
)
from antidote_llm.evaluation.judges.phrases import (
    GCG_REFUSAL_PHRASES,
    REFUSAL_PHRASES,
    GcgJudge,
    RefusalJudge,
    gcg_refusal_phrases,
    refusal_phrases,
)

JUDGES: dict[str, Callable[[JudgeOptions], Judge]] = {
    "refusal": lambda options: RefusalJudge(),
    "gcg": lambda options: GcgJudge(),
    "beaver-dam": BeaverDamJudge,
    "llama-guard": LlamaGuardJudge,
    "classifier": ClassifierJudge,
    "endpoint": EndpointJudge,
}


def get_judge(name: str, options: JudgeOptions | None = None) -> Judge:
    """A ready judge by registry name; model-backed judges check their weights can be found now."""
    try:
        factory = JUDGES[name]
    except KeyError:
        raise AntidoteError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}") from None
    options = options or JudgeOptions()
    if options.batch_size < 1:
        raise AntidoteError(f"judge batch size must be at least 1, got {options.batch_size}")
    return factory(options)


__all__ = [
    "BEAVER_DAM", "BEAVER_DAM_CATEGORIES", "BEAVER_DAM_MAX_LENGTH", "BEAVER_DAM_PROMPT", "DEFAULT_JUDGE_BATCH_SIZE",
    "DEFAULT_THRESHOLD", "GCG_REFUSAL_PHRASES", "JUDGES", "LLAMA_GUARD", "LLAMA_GUARD_CATEGORIES", "LLAMA_GUARD_PROMPT",
    "PROMPT_FORMATS", "REFUSAL_PHRASES", "STRONGREJECT_PROMPT", "STRONGREJECT_SYSTEM",
    "BeaverDamJudge", "ClassifierJudge", "EndpointJudge", "EndpointSettings", "GcgJudge", "Judge", "JudgeOptions",
    "Judgement", "LlamaGuardJudge", "ModelJudge", "RefusalJudge", "SequenceClassifierJudge", "Verdict", "degeneracy",
    "gcg_refusal_phrases", "get_judge", "parse_category_probabilities", "parse_llama_guard", "parse_strongreject",
    "refusal_phrases", "strongreject_score",
]
