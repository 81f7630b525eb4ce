"""`python -m workers`: run one data-plane worker process."""

import sys

from workers.main import main

sys.exit(main())
