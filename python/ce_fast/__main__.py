"""``python -m ce_fast ...``: the ``ce-fast`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
