"""`python -m tml.launch WORKFLOW ...`: the same as `tml launch WORKFLOW ...`."""

import sys

from tml.launch.cli import main

if __name__ == "__main__":
    main(["launch", *sys.argv[1:]])
