#!/usr/bin/env python3
"""Deploy the whole system on this machine: Redis (embedded by default) and every service.

Usage: .venv/bin/python scripts/deploy-federated-learning.py [--config FILE] [--workers N]
"""

import sys

from federated_learning.deploy.launcher import main

if __name__ == "__main__":
    sys.exit(main())
