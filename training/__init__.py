"""Training: trainer, config and recipes, losses, model selection, checkpointing, optimization, the run's export."""
