"""``python -m metatl``: the ``metatl`` command."""

import sys

from .cli import main

sys.exit(main())
