"""Singular value decomposition of deltas and rank selection."""
