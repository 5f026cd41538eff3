"""Pushing a repaired model's folder to the Hugging Face Hub (`--push-to-hub REPO`) through huggingface_hub.

Everything a push needs is checked before any work (`check_push`: the repo id, offline mode, a token, the hub
answering for it), so a run that cannot push writes nothing; an upload that still fails afterwards is one line."""

from __future__ import annotations

import os
from pathlib import Path

from antidote_llm.errors import AntidoteError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # the endpoint as the environment says now


def check_push(repo_id: str) -> None:
    """Refuse, before any work, a push that cannot happen: a bad repo id, offline mode, no token, a hub that does
    not answer or refuses the token."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise AntidoteError(f"--push-to-hub {repo_id!r} is not a hub repo id ({_first_line(exc)}); give OWNER/NAME") from None
    if constants.is_offline_mode():
        raise AntidoteError(f"cannot push to {repo_id}: the hub is off (HF_HUB_OFFLINE is set); unset it or drop "
                            "--push-to-hub")
    token = get_token()
    if not token:
        raise AntidoteError(f"cannot push to {repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    api = _api()
    try:
        api.whoami(token=token)
    except Exception as exc:  # httpx, HTTP and hub errors alike: the user needs one line
        raise AntidoteError(f"cannot push to {repo_id}: the hub at {api.endpoint} did not accept the token "
                            f"({_first_line(exc)}); check the network, HF_ENDPOINT and HF_TOKEN") from None


def push_folder(folder: Path, repo_id: str, *, message: str, private: bool = False) -> str:
    """Create the model repo if needed and upload `folder` to it as one commit; the repo's URL."""
    from huggingface_hub import get_token

    api = _api()
    token = get_token()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True, token=token)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=message,
                          token=token)
    except Exception as exc:  # httpx, HTTP and hub errors alike: the user needs one line
        raise AntidoteError(f"pushing {folder} to {repo_id} failed: {_first_line(exc)}; the folder is written, "
                            "push it again with `hf upload`") from None
    return str(url)
