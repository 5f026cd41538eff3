"""`python -m antidote_llm ...` is the `antidote` command (e.g. under `accelerate launch -m antidote_llm`)."""

import sys

from antidote_llm.cli.main import main

sys.exit(main())
