"""``python -m memlm …`` is the ``memlm`` command line (so is ``torchrun … -m memlm train …``)."""
from __future__ import annotations

import sys

from memlm.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
