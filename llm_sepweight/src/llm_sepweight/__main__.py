"""``python -m llm_sepweight``: the same as the ``llm-sepweight`` command."""

import sys

from .cli import main

sys.exit(main())
