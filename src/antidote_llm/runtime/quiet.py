"""Library warnings that tell a user of `antidote` nothing they can act on, silenced narrowly.

Each entry is one exact message (matched from its start) and its category; anything else still shows.
Installed once, when `antidote_llm` is imported.
"""

from __future__ import annotations

import re
import warnings

# (start of the message, category, why it is noise)
LIBRARY_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    (
        "`is_gradient_checkpointing` is deprecated",
        FutureWarning,
        "transformers 5 deprecates the property; PEFT still reads it on every get_peft_model / PeftModel call",
    ),
)


def quiet_library_warnings() -> None:
    """Add one `ignore` filter per LIBRARY_NOISE entry. Idempotent: warnings replaces an equal filter."""
    for message, category, _why in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
