"""LaCT: Large Chunk Test-Time Training in plain PyTorch (no Lightning import anywhere in this package)."""
