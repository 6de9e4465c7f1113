"""`python -m bakery_slurm ...` is `bakery-slurm ...` (how array tasks call run-cell)."""

from .cli import main

main()
