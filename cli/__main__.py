"""``python -m crossmetric.cli`` (and ``accelerate launch -m crossmetric.cli``) runs the ``crossmetric`` command."""

import sys

from .main import main

sys.exit(main())
