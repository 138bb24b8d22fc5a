"""Training side: data, samplers, losses, trainer, metrics, export, Hub, model card, CLI."""
