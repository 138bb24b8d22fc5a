"""Evaluation: retrieval metrics, exact kNN, the evaluator, baselines, the re-ranking probe, reports, attention maps."""
