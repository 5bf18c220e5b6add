"""``python -m minilora`` runs the ``minilora`` command."""

import sys

from minilora.cli import main

sys.exit(main())
