"""``python -m agents run --app MODULE:FACTORY --agent-id ID``: see :mod:`agents.runner`."""

import sys

from agents.runner import main

sys.exit(main())
