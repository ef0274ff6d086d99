"""``python -m kd2m`` == the ``kd2m`` command (also what ``torchrun -m kd2m`` runs)."""
import sys

from .harness.cli import main

sys.exit(main())
