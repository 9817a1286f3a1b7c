"""Continual-learning pieces: exemplar memory, background-shift-aware losses, strategies."""
