"""One decision for whether Antidote prunes the live fine-tuning adapter (every loader and path asks it)."""

from __future__ import annotations

import pytest

from antidote_llm.core.targets import adapter_mode
from antidote_llm.errors import AntidoteError


@pytest.mark.parametrize(("specs", "has_adapter", "expected"), [
    (("auto",), True, True),
    (("auto",), False, False),
    (("adapter",), True, True),
    (("adapter-a",), True, True),
    (("adapter-b",), True, True),
    (("adapter-a",), False, True),  # asked for without an adapter: resolve_targets then says to pass --adapter
    (("qkv",), True, False),
    (("adapter", "qkv"), True, False),  # refused by resolve_targets, never loaded as adapter mode
])
def test_adapter_mode_covers_every_factor_set_and_auto(specs, has_adapter, expected):
    assert adapter_mode(specs, has_adapter) is expected


def test_auto_combined_with_other_targets_is_refused():
    with pytest.raises(AntidoteError, match="'auto' cannot be combined"):
        adapter_mode(("auto", "qkv"), True)
