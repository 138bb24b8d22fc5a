"""Entry point that lets ``evaluate.load("<...>/training/evaluate_metric")`` load this folder.

``evaluate.load`` of a directory looks for a script named after the directory; this one re-exports the
module defined in ``crossmetric_retrieval.py`` (copied alongside by ``evaluate``'s relative-import rule).
"""

from .crossmetric_retrieval import CrossmetricRetrieval

__all__ = ["CrossmetricRetrieval"]
