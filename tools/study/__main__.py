"""`python -m tools.study`: see tools/study/cli.py."""

import sys

from tools.study import cli

if __name__ == "__main__":
  sys.exit(cli.main())
