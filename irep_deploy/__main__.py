from __future__ import annotations

import signal
import sys


def _terminated_early(signum: int, frame: object) -> None:
    """SIGTERM while Python imports the CLI, before main() installs its own handler: the same line."""
    sys.stderr.write("irep-deploy: terminated (SIGTERM)\n")
    raise SystemExit(143)


signal.signal(signal.SIGTERM, _terminated_early)
try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI itself imports: one line and 130, as from main()
    sys.stderr.write("irep-deploy: interrupted\n")
    exec("")  # clears CPython's record of the interrupt (see cli._interrupted), or it dies by SIGINT
    sys.exit(130)

sys.exit(main())
