"""``python -m wpcrack`` = the ``wpcrack`` command (what torchrun starts: ``torchrun ... -m wpcrack train``)."""

import sys

from wpcrack.cli import main

if __name__ == "__main__":
    sys.exit(main())
