"""Built-in experiment configs (the demo)."""
