"""Shard writers for the three formats, on webdataset's ``ShardWriter``.

Each writer fills ``<out_dir>/<prefix>-000000.tar``, ``-000001.tar``, ... with at most
``samples_per_shard`` samples (or ``max_shard_bytes``) each. Tar headers carry a fixed mtime, so the
same samples give byte-identical shards. Keys are checked (no dots, unique within the writer).

    with SceneWriter("data/scenes/train", samples_per_shard=100) as writer:
        writer.write("scene_0000000", images, intrinsics, w2c)
    writer.shards  # the tar files written
"""

from __future__ import annotations

import os

import webdataset as wds

from datamodules.formats import check_key, encode_scene, encode_tokens, encode_video


class _ShardSink:
    def __init__(
        self,
        out_dir: str,
        *,
        samples_per_shard: int = 1000,
        max_shard_bytes: float = 1e9,
        prefix: str = "shard",
    ):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        os.makedirs(out_dir, exist_ok=True)
        self.pattern = os.path.join(out_dir, f"{check_key(prefix)}-%06d.tar")
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.shards: list[str] = []
        self.count = 0
        self._keys: set[str] = set()
        self._writer: wds.ShardWriter | None = None  # opened on the first sample: no empty shard

    def _write(self, key: str, fields: dict[str, bytes]) -> None:
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} (keys must be unique)")
        if self._writer is None:
            self._writer = wds.ShardWriter(
                self.pattern,
                maxcount=self.samples_per_shard,
                maxsize=self.max_shard_bytes,
                post=self.shards.append,
                verbose=0,
                encoder=False,
                mtime=0,  # an int: a float mtime makes tarfile add a PAX header to every entry
            )
        self._writer.write({"__key__": key, **fields})
        self._keys.add(key)
        self.count += 1

    def close(self) -> list[str]:
        """Finish the last shard; returns the paths of all shards written."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SceneWriter(_ShardSink):
    def write(self, key: str, images, intrinsics, w2c) -> None:
        """One scene: images uint8 ``[V, H, W, 3]``, intrinsics ``[V, 4]`` (fx, fy, cx, cy, pixels),
        w2c ``[V, 4, 4]`` (OpenCV world-to-camera). numpy arrays or tensors."""
        self._write(key, encode_scene(images, intrinsics, w2c))


class TokenWriter(_ShardSink):
    def write(self, key: str, tokens, meta: dict) -> None:
        """One token sequence: 1-D uint16 or uint32 ids, and a JSON-able ``meta`` (tokenizer, vocab_size, ...)."""
        self._write(key, encode_tokens(tokens, meta))


class VideoWriter(_ShardSink):
    def write(
        self, key: str, frames=None, latents=None, caption: str | None = None, caption_embedding=None
    ) -> None:
        """One video: ``frames`` uint8 ``[T, H, W, 3]`` or ``latents`` float16 ``[C, T, h, w]``; optional caption
        and caption embeddings float16 ``[tokens, width]`` (conditioned video models)."""
        self._write(key, encode_video(frames, latents, caption, caption_embedding))
