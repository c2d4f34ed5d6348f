"""One module per benchmark of scripts/bench.py (each registers its own subcommand)."""
