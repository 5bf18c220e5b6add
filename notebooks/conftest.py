"""pytest runs these notebooks (through nbmake, see tests/conftest.py) in their quick mode.

nbmake starts each notebook's kernel as a subprocess of the pytest process (of each xdist
worker), so an environment variable set here, at import time, reaches every kernel. With
``MINILORA_QUICK=1`` the notebooks run fewer steps on fewer examples and finish in seconds.
Run the full versions under pytest with ``MINILORA_QUICK=0 python -m pytest notebooks``.
"""

import os

os.environ.setdefault("MINILORA_QUICK", "1")
