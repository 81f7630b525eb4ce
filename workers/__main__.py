"""`python -m workers`: run one data-plane worker process."""

import sys

try:
    from workers.main import main
except Exception as e:  # an install or import problem: restarting cannot fix it
    print(f"worker failed to start: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)  # ztunnel.core.ipc.EXIT_BOOT_ERROR

sys.exit(main())
