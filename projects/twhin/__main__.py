"""`python -m projects.twhin ...`: the `twhin` command line (see projects/twhin/cli.py)."""

from .cli import main

if __name__ == "__main__":
    main()
