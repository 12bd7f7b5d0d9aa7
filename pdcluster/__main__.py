"""`python -m pdcluster ...`: the same as the `pdcluster` command."""

import sys

from pdcluster.cli import main

sys.exit(main())
