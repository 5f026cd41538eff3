"""Command-line options built from the typed settings objects, so a flag's type, choices, default and help
are the config's own and cannot drift from the Python API or the lab."""

from __future__ import annotations

import argparse
import types
from collections.abc import Iterable, Mapping
from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from antidote_llm.errors import validated


def _unwrap_optional(annotation):
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return annotation


def _argument(annotation) -> dict:
    """argparse keywords for a field's type: Literal -> choices, tuple[...] -> repeatable, bool -> switch."""
    annotation = _unwrap_optional(annotation)
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        return {"choices": list(choices), "type": type(choices[0])}
    if get_origin(annotation) is tuple:  # repeatable; comma lists and choices are the config's to check
        inner = get_args(annotation)[0]
        return {"action": "append", "type": str if get_origin(inner) is Literal else inner}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation}


def _default_text(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def add_config_options(
    group,
    settings: type[BaseModel],
    fields: Iterable[str],
    *,
    flags: Mapping[str, str] | None = None,
    help_extra: Mapping[str, str] | None = None,
    optional: Iterable[str] = (),
    show_defaults: bool = True,
    prefix: str = "",
) -> None:
    """One option per field of `settings`: `--field-name` unless `flags` renames it. Every option defaults to
    None, so a flag left out keeps the config's default (shown in the help). Fields in `optional` are not
    required on the command line even when the config requires them (the command checks them itself);
    `show_defaults` False leaves the config's defaults out of the help (when a preset supplies the values);
    `prefix` keeps two settings objects' fields of one name apart (dest and default flag `--PREFIX-name`)."""
    flags, help_extra, optional = flags or {}, help_extra or {}, set(optional)
    for name in fields:
        info = settings.model_fields[name]
        flag = "--" + flags.get(name, (prefix + name).replace("_", "-"))
        default = info.get_default(call_default_factory=True)
        parts = [info.description or "", help_extra.get(name, "")]
        required = info.is_required() and name not in optional
        if required:
            parts.append("(required)")
        elif show_defaults and default not in (PydanticUndefined, None):
            parts.append(f"(default: {_default_text(default)})")
        group.add_argument(flag, dest=prefix + name, default=None, required=required,
                           help=" ".join(p for p in parts if p), **_argument(info.annotation))


def config_from_args(settings: type[BaseModel], args: argparse.Namespace, fields: Iterable[str], *, prefix: str = "",
                     **given):
    """The validated settings: every flag the user gave, then `given` (None values left out); the rest keep the
    config's defaults."""
    values = {name: getattr(args, prefix + name) for name in fields if getattr(args, prefix + name, None) is not None}
    return validated(settings, {**values, **{name: value for name, value in given.items() if value is not None}})
