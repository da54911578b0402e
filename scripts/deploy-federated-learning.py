#!/usr/bin/env python3
"""Deploy the whole system on this machine: Redis (embedded by default) and every service.

Usage: python3 scripts/deploy-federated-learning.py [--config FILE] [--workers N]

Writes <data_dir>/run/deployment.json (the dashboard URL and the API key, mode 0600) and runs
until Ctrl-C or SIGTERM. With an external redis_url that does not answer, it stops at once
with one line naming the URL and the cause (exit code 1).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import use_venv

use_venv()

from federated_learning.deploy.launcher import main

if __name__ == "__main__":
    sys.exit(main())
