"""Entry point: `sudo .venv/bin/python -m bench [--quick] [--proxy squid|tinyproxy]`."""

import sys

from bench.cli import main

sys.exit(main())
