"""``python -m llm_partial_run``: the same as the ``llm-partial-run`` command."""

import sys

from .cli import main

sys.exit(main())
