"""CLI subcommands; see antidote_llm.cli."""
