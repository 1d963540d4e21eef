"""``python -m dslab`` runs the same command as the ``dslab`` script."""

from dslab.cli.app import main

main()
