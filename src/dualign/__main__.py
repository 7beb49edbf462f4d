"""``python -m dualign``: the command line (:mod:`dualign.cli`)."""

import sys

from dualign.cli import main

sys.exit(main())
