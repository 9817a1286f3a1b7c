"""Prefect tasks: thin, retryable wrappers over `incseg` library calls."""
