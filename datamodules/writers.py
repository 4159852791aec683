"""Shard writers for the three formats, on webdataset's ``ShardWriter``.

Each writer fills ``<out_dir>/<prefix>-000000.tar``, ``-000001.tar``, ... with at most
``samples_per_shard`` samples (or ``max_shard_bytes``) each. Tar headers carry a fixed mtime, so the
same samples give byte-identical shards. Keys are checked (no dots, unique within the writer).

    with SceneWriter("data/scenes/train", samples_per_shard=100) as writer:
        writer.write("scene_0000000", images, intrinsics, w2c)
    writer.shards  # the tar files written

:func:`shard_folder` makes a whole preparation atomic: everything is written into ``<out>.incomplete``
(holding the marker file ``INCOMPLETE``) and renamed to ``<out>`` only when complete, so a killed
import never leaves a folder that looks finished; the readers refuse a folder that holds the marker.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterator

import webdataset as wds

from datamodules.formats import check_key, encode_scene, encode_tokens, encode_video

INCOMPLETE = "INCOMPLETE"  # marker file of a folder still being written (see shard_folder)
INCOMPLETE_NOTE = (
    "this folder is being written by python -m datamodules.prepare (or a DataModule preparing its data) and "
    "is renamed when complete; if that process is gone, it was interrupted: run it again, or delete this folder\n"
)


def incomplete_folder_error(folder: str) -> str | None:
    """The error message for a shard folder left by an interrupted preparation, or None when it is fine."""
    if os.path.exists(os.path.join(folder, INCOMPLETE)) and not os.path.exists(
        os.path.join(folder, "meta.json")
    ):
        return (
            f"{folder} is an interrupted data preparation: it has no meta.json and still holds the marker "
            f"file {INCOMPLETE}; run the prepare command again (with --overwrite if the target exists), or "
            "delete the folder"
        )
    return None


@contextlib.contextmanager
def shard_folder(out: str, overwrite: bool = False) -> Iterator[str]:
    """Write a shard folder atomically: yields ``<out>.incomplete`` to write into, renamed to ``out`` on success.

    A folder ``out`` that already holds shards is refused unless ``overwrite`` (a reader would mix old and
    new shards). On an exception the temporary folder is removed; if the process is killed it stays,
    marked ``INCOMPLETE``, and the readers refuse it with a message saying how to recover.
    """
    out = os.path.normpath(out)
    old = sorted(glob.glob(os.path.join(out, "*.tar")))
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds {len(old)} shards; pass --overwrite to replace them")
    tmp = f"{out}.incomplete"
    if os.path.exists(tmp):
        if not os.path.exists(os.path.join(tmp, INCOMPLETE)):
            raise FileExistsError(f"{tmp} exists and was not written by an earlier preparation; move it away")
        shutil.rmtree(tmp)  # what an interrupted earlier run left
    os.makedirs(tmp)
    with open(os.path.join(tmp, INCOMPLETE), "w") as f:
        f.write(INCOMPLETE_NOTE)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.remove(os.path.join(tmp, INCOMPLETE))
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if not os.path.exists(out):
        os.rename(tmp, out)  # atomic: `out` appears complete or not at all
        return
    # `out` exists (with other files a user may keep there): mark it, then swap the contents in.
    marker = os.path.join(out, INCOMPLETE)
    with open(marker, "w") as f:
        f.write(INCOMPLETE_NOTE)
    for path in old + glob.glob(os.path.join(out, "meta.json")):
        os.remove(path)
    names = sorted(os.listdir(tmp), key=lambda n: n == "meta.json")  # meta.json last
    for name in names:
        target = os.path.join(out, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)
    os.remove(marker)


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

    def _encode(self, key: str, encode, *args, **kwargs) -> dict[str, bytes]:
        try:
            return encode(*args, **kwargs)
        except ValueError as exn:  # name the sample: the writer is often fed from a loop over many
            raise ValueError(f"{self.pattern % len(self.shards)}: sample {key!r}: {exn}") from exn

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
        self._write(key, self._encode(key, encode_scene, images, intrinsics, w2c))


class TokenWriter(_ShardSink):
    def write(self, key: str, tokens, meta: dict) -> None:
        """One token sequence: 1-D uint16 or uint32 ids, and a JSON-able ``meta`` (tokenizer, vocab_size, ...)."""
        self._write(key, self._encode(key, encode_tokens, tokens, meta))


class VideoWriter(_ShardSink):
    def write(
        self, key: str, frames=None, latents=None, caption: str | None = None, caption_embedding=None
    ) -> None:
        """One video: ``frames`` uint8 ``[T, H, W, 3]`` or ``latents`` float16 ``[C, T, h, w]``; optional caption
        and caption embeddings float16 ``[tokens, width]`` (conditioned video models)."""
        self._write(key, self._encode(key, encode_video, frames, latents, caption, caption_embedding))
