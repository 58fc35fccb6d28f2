"""`python -m star_edge ...` runs the CLI."""

from star_edge.cli import main

main()
