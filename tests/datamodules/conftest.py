"""Tiny shard sets shared by the data-layer tests (a few KB each, written in milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.cameras import look_at_w2c
from datamodules.writers import SceneWriter, TokenWriter, VideoWriter


def random_scene(rng: np.random.Generator, views: int = 3, height: int = 6, width: int = 8) -> dict:
    """Random pixels and float32 cameras (rotations, so the reader's camera check passes)."""
    eyes = rng.normal(size=(views, 3))
    eyes *= 2.5 / np.linalg.norm(eyes, axis=1, keepdims=True)
    return {
        "images": rng.integers(0, 256, (views, height, width, 3), dtype=np.uint8),
        "intrinsics": rng.uniform(1, 100, (views, 4)).astype(np.float32),
        "w2c": look_at_w2c(eyes).astype(np.float32),
    }


def write_scenes(out, count: int, per_shard: int, seed: int = 0, **scene_kwargs) -> dict[str, dict]:
    """Write ``count`` random scenes; returns them by key."""
    rng = np.random.default_rng(seed)
    scenes = {}
    with SceneWriter(str(out), samples_per_shard=per_shard) as writer:
        for i in range(count):
            scene = random_scene(rng, **scene_kwargs)
            writer.write(f"scene_{i:04d}", **scene)
            scenes[f"scene_{i:04d}"] = scene
    return scenes


def write_token_shards(
    out, count: int, per_shard: int, length: int = 17, dtype=np.uint16, seed: int = 0
) -> dict:
    rng = np.random.default_rng(seed)
    vocab = 257 if dtype == np.uint16 else 100_000
    seqs = {}
    with TokenWriter(str(out), samples_per_shard=per_shard) as writer:
        for i in range(count):
            tokens = rng.integers(0, vocab, length).astype(dtype)
            writer.write(f"seq_{i:05d}", tokens, {"tokenizer": "test", "vocab_size": vocab})
            seqs[f"seq_{i:05d}"] = tokens
    return seqs


def write_video_shards(out, count: int, per_shard: int, shape=(4, 6, 8, 3), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    videos = {}
    with VideoWriter(str(out), samples_per_shard=per_shard) as writer:
        for i in range(count):
            frames = rng.integers(0, 256, shape, dtype=np.uint8)
            writer.write(f"video_{i:04d}", frames=frames, caption=f"video number {i}")
            videos[f"video_{i:04d}"] = frames
    return videos


@pytest.fixture
def scene_shards(tmp_path):
    """(folder, scenes by key): 10 scenes of 3 views 6x8 in 4 shards (3, 3, 3, 1)."""
    folder = tmp_path / "scenes"
    return folder, write_scenes(folder, 10, 3)
