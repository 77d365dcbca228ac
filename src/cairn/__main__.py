"""``python -m cairn ...`` (what ``torchrun -m cairn train pretrain ...`` runs)."""

import sys

from cairn.cli import main

sys.exit(main())
