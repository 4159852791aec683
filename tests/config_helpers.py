"""Reading configs as the CLI merges them, without building the model (paper-scale configs on the meta device)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def merge(base: dict, overlay: dict) -> dict:
    """Overlay a parsed YAML config on another, mapping by mapping, as a second `--config` does."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def merged_config(*paths: str) -> dict:
    """configs/<path> files (relative to the repository root) merged in order."""
    config: dict = {}
    for path in paths:
        config = merge(config, yaml.safe_load((ROOT / path).read_text()))
    return config
