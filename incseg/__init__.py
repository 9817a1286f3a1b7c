"""incseg: the ML core of the incremental segmentation pipeline (no orchestration inside)."""

__version__ = "0.1.0"
