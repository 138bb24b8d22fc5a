"""The ``crossmetric`` command: one module per sub-command (``python -m crossmetric.cli``)."""
