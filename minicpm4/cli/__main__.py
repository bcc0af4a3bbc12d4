"""`python -m minicpm4.cli`: the same as the `minicpm4` command."""

from minicpm4.cli import main

main()
