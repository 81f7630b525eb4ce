"""`python -m ztunnel`: the same as the `ztunnel` command."""

import sys

from ztunnel.supervisor.cli import main

sys.exit(main())
