"""The undefended baseline: the fine-tuned model as the user got it."""

from __future__ import annotations

from typing import ClassVar

from antidote_llm.registry import Defense, register


@register
class NoDefense(Defense):
    name: ClassVar[str] = "none"
    description: ClassVar[str] = "no defense: the fine-tuned model as the user got it"
