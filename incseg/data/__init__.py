"""Data: the registry layout, the synthetic stream, datasets and joint transforms."""
