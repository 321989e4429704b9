"""The proxyvpn benchmark suite: `sudo .venv/bin/python -m bench` (see bench/README.md)."""
