"""``python -m app.cli ...``: the same as the ``emotion-server`` command."""

import sys

from app.cli import main

sys.exit(main())
