"""`python -m progressive`."""

import sys

from progressive.cli import main

sys.exit(main())
