"""``python -m scheduler`` runs the powertrain CLI."""

from scheduler.cli import main

main()
