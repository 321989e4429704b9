"""`python -m proxyvpn` is the `proxyvpn` command."""

from proxyvpn.cli import main

main(prog_name="proxyvpn")
