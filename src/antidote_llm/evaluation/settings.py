"""How a model is evaluated: one settings object for `antidote evaluate`, the Python API and the lab."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from antidote_llm.errors import AntidoteError, validated
from antidote_llm.evaluation.generation import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from antidote_llm.evaluation.judges.base import EndpointSettings, JudgeOptions

# The settings that choose and reach the judge (flags of their own names: --judge-model, --base-url, ...).
JUDGE_FIELDS = ("judge", "judge_model", *EndpointSettings.model_fields)
# How the endpoint is reached, never what it answers: left out of cache keys, so changing them recomputes nothing.
TRANSPORT_FIELDS = frozenset({"api_key_env", "judge_concurrency", "judge_timeout", "judge_retries", "judge_backoff",
                              "judge_cache"})


class EvalSettings(EndpointSettings):
    """The judge and the generation limits. Defaults are the paper's (512 new tokens for harmful prompts,
    the authors' per-task limit for task rows). The endpoint judge's settings are EndpointSettings' fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    judge: str = Field(default="refusal", description="judge of harmful answers:")
    judge_model: str | None = Field(
        default=None, description="judge weights (directory or hub id; required for classifier), or the served "
        "model's name for the endpoint judge")
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1,
                                description="answer length limit for harmful prompts (the paper's 512)")
    task_max_new_tokens: int | None = Field(default=None, ge=1,
                                            description="answer length limit for task rows (default: the authors' per task)")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, description="prompts generated together")
    stop_settled: bool = Field(
        default=False, description="stop generating a harmful-prompt answer once a phrase judge's verdict cannot "
        "change: the same harmful score in less time; the degenerate check then reads answers only that far")
    task_prompt: Literal["authors", "training"] = Field(
        default="authors", description="task rows' prompt: the authors' evaluation strings (SST-2 without the newline "
        "after '### Response:') or exactly the training prompt")

    @field_validator("judge")
    @classmethod
    def _known_judge(cls, name: str) -> str:
        from antidote_llm.evaluation.judges import JUDGES

        if name not in JUDGES:
            raise ValueError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
        return name

    @field_validator("judge_format")
    @classmethod
    def _known_format(cls, name: str) -> str:
        from antidote_llm.evaluation.judges.formats import prompt_format

        try:
            prompt_format(name)
        except AntidoteError as exc:  # an unknown one: the formats named, where the setting is
            raise ValueError(str(exc)) from None
        return name

    def result_key(self) -> dict:
        """The settings that can change an evaluation's result: what a cache of results is keyed by."""
        return self.model_dump(mode="json", include=set(type(self).model_fields) - TRANSPORT_FIELDS)

    def judge_options(self, **given) -> JudgeOptions:
        """The judge's options from these settings; `given` adds the in-process judges' own (label, threshold, ...)."""
        endpoint = EndpointSettings(**self.model_dump(include=set(EndpointSettings.model_fields)))
        return JudgeOptions(model=self.judge_model, endpoint=endpoint, **given)

    @classmethod
    def build(cls, settings: EvalSettings | None = None, **fields) -> EvalSettings:
        """`settings` with `fields` replaced (validated); the defaults when both are empty."""
        base = settings.model_dump(include=set(cls.model_fields)) if settings is not None else {}
        return validated(cls, {**base, **fields})
