"""Arguments every model-loading command shares, and the judge's options every evaluating command shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from antidote_llm.cli.options import add_config_options
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation.judges import JUDGES, PROMPT_FORMATS
from antidote_llm.evaluation.settings import JUDGE_FIELDS, EvalSettings
from antidote_llm.runtime.hub import push_folder
from antidote_llm.runtime.loading import BUILTIN_MODELS, DTYPES, ModelSource
from antidote_llm.runtime.modelcard import card_folder

# One flag per judge setting, the same in every command: --judge, --judge-model, --base-url, --judge-format, ...
JUDGE_FLAGS = {name: name.replace("_", "-") for name in JUDGE_FIELDS}
JUDGE_HELP = {"judge": f"one of {', '.join(JUDGES)}", "judge_format": f"one of {', '.join(PROMPT_FORMATS)}"}


def add_judge_options(group, *, prefix: str = "") -> None:
    """The judge's settings (EvalSettings' JUDGE_FIELDS) as options; `prefix` as in add_config_options."""
    add_config_options(group, EvalSettings, JUDGE_FIELDS, flags=JUDGE_FLAGS, help_extra=JUDGE_HELP, prefix=prefix)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", required=True,
        help=f"model directory, .gguf file, hub id, or built-in name ({', '.join(BUILTIN_MODELS)})",
    )
    group.add_argument(
        "--adapter", action="append", default=[], metavar="DIR",
        help="LoRA adapter directory (PEFT); repeat to apply several in order",
    )
    group.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    group.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto for multi-GPU")
    group.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")


def model_source(args: argparse.Namespace) -> ModelSource:
    return ModelSource(
        model=args.model,
        adapters=tuple(args.adapter),
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
    )


def add_model_command(subparsers, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand that reads a model: its parser with the model options added."""
    parser = subparsers.add_parser(name, help=help, description=description)
    add_model_arguments(parser)
    return parser


CATEGORY_HELP = ("field of each {what}'s harm category: its harmful score is also reported per category (detected "
                 "when omitted: category, SemanticCategory; a field named here must exist)")


def add_push_arguments(group) -> None:
    group.add_argument("--push-to-hub", metavar="REPO", help="upload the repaired model's folder (adapter/ or model/, "
                       "with its model card README.md) to this Hugging Face model repo (created if needed; needs "
                       "HF_TOKEN or `hf auth login`; checked before any work)")
    group.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")


def push_repaired(out: str, outputs: dict, repo: str, message: str, private: bool) -> str:
    """Upload the written model folder of `outputs` (under `out`) to `repo`; the line to print."""
    folder = card_folder(outputs)
    if folder is None:
        raise AntidoteError(f"nothing to push to {repo}: no model folder was written in {out}")
    url = push_folder(Path(out) / folder, repo, message=message, private=private)
    return f"  pushed {folder}/ (with its model card) to {url}"
