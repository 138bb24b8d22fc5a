"""Utilities for every layer: atomic file writes, test-only fault points."""
