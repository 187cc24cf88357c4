"""``python -m deepsqueeze`` runs the CLI (also what ``torchrun -m deepsqueeze`` launches)."""

from deepsqueeze.cli import main

main()
