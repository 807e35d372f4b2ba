"""`python -m pyrovae` is the `pyrovae` command."""

import sys

from pyrovae.cli import main

sys.exit(main())
