"""``python -m fiona``."""

from fiona.cli import main

main()
