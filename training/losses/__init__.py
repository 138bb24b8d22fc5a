"""Losses: pair losses, proxy losses, the cross-image-attention objective, the loss registry."""
