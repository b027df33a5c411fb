"""`python -m launch` is `nsa-dist` (launch/cli.py)."""

import sys

from launch.cli import main

sys.exit(main())
