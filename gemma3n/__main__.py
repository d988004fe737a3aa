"""`python -m gemma3n`: the `gemma3n` command (see `gemma3n.cli`)."""

import sys

from gemma3n.cli import main

if __name__ == '__main__':
    sys.exit(main())
