"""``python -m vitslim`` (and ``torchrun -m vitslim``): the command line."""

import sys

from vitslim.apps.cli import main

sys.exit(main())
