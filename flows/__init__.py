"""Prefect flows: short functions that call tasks in order, decisions visible."""
