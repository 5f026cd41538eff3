"""Antidote: post-fine-tuning safety re-alignment by one-shot pruning of harmful weights."""

from .errors import AntidoteError

__all__ = ["AntidoteError"]
__version__ = "0.1.0"
