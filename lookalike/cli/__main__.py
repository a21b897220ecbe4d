"""``python -m lookalike.cli``: the command line."""

from lookalike.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
