"""Writer -> reader round trips: exact pixels, exact cameras, exact tokens, exact frames and latents."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from datamodules.readers import iter_scenes, iter_tokens, iter_videos
from datamodules.writers import SceneWriter, TokenWriter, VideoWriter

from .conftest import write_scenes, write_token_shards, write_video_shards


def test_scenes_round_trip_exactly(scene_shards):
    folder, scenes = scene_shards
    seen = list(iter_scenes(folder, num_views=3, image_size=(6, 8)))
    assert [s["key"] for s in seen] == sorted(scenes)  # in write order, across 4 shards
    for sample in seen:
        want = scenes[sample["key"]]
        assert sample["images"].dtype == torch.uint8 and sample["images"].shape == (3, 6, 8, 3)
        assert torch.equal(sample["images"], torch.from_numpy(want["images"]))
        assert torch.equal(sample["intrinsics"], torch.from_numpy(want["intrinsics"]))
        assert torch.equal(sample["w2c"], torch.from_numpy(want["w2c"]))
        assert sample["shard"].endswith(".tar")


def test_scene_layout_is_the_documented_one(tmp_path):
    scenes = write_scenes(tmp_path, 1, 1, views=2, height=4, width=5)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = tar.getnames()
        cameras = json.load(tar.extractfile("scene_0000.cameras.json"))
    assert names == ["scene_0000.000.png", "scene_0000.001.png", "scene_0000.cameras.json"]
    assert sorted(cameras[0]) == ["cx", "cy", "fx", "fy", "h", "w", "w2c"]
    assert (cameras[1]["w"], cameras[1]["h"]) == (5, 4)
    assert np.array(cameras[1]["w2c"], dtype=np.float32).tolist() == scenes["scene_0000"]["w2c"][1].tolist()


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_tokens_round_trip_exactly(tmp_path, dtype):
    seqs = write_token_shards(tmp_path, 7, 3, length=33, dtype=dtype)
    seen = list(iter_tokens(tmp_path, length=33))
    assert [s["key"] for s in seen] == sorted(seqs)
    for sample in seen:
        assert sample["tokens"].dtype == torch.int64
        assert sample["tokens"].tolist() == seqs[sample["key"]].tolist()
        assert sample["meta"]["vocab_size"] == (257 if dtype == np.uint16 else 100_000)


@pytest.mark.parametrize("length", [56 * 1024 + 1, 128 * 1024 + 1])
def test_long_token_sequences_round_trip_exactly(tmp_path, length):
    rng = np.random.default_rng(length)
    tokens = rng.integers(0, 2**16, length).astype(np.uint16)
    with TokenWriter(str(tmp_path)) as writer:
        writer.write("long", tokens, {"tokenizer": "test", "vocab_size": 2**16})
    (sample,) = iter_tokens(tmp_path, length=length)
    assert torch.equal(sample["tokens"], torch.from_numpy(tokens.astype(np.int64)))


def test_videos_round_trip_exactly(tmp_path):
    videos = write_video_shards(tmp_path, 5, 2, shape=(5, 6, 8, 3))
    seen = list(iter_videos(tmp_path, shape=(5, None, None, 3)))
    assert [s["key"] for s in seen] == sorted(videos)
    for i, sample in enumerate(seen):
        assert sample["frames"].dtype == torch.uint8
        assert torch.equal(sample["frames"], torch.from_numpy(videos[sample["key"]]))
        assert sample["caption"] == f"video number {i}"


def test_latents_round_trip_exactly(tmp_path):
    latents = np.random.default_rng(0).standard_normal((4, 3, 5, 6)).astype(np.float16)
    with VideoWriter(str(tmp_path)) as writer:
        writer.write("lat", latents=latents)
    (sample,) = iter_videos(tmp_path, field="latents")
    assert sample["latents"].dtype == torch.float16
    assert torch.equal(sample["latents"], torch.from_numpy(latents))
    assert sample["caption"] == ""


def test_writers_are_byte_deterministic(tmp_path):
    write_scenes(tmp_path / "a", 4, 2, seed=3)
    write_scenes(tmp_path / "b", 4, 2, seed=3)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_writers_refuse_bad_keys_and_arrays(tmp_path):
    with SceneWriter(str(tmp_path)) as writer:
        good = {
            "images": np.zeros((1, 2, 2, 3), np.uint8),
            "intrinsics": np.ones((1, 4)),
            "w2c": np.eye(4)[None],
        }
        with pytest.raises(ValueError, match="not allowed"):
            writer.write("has.dot", **good)
        with pytest.raises(ValueError, match="images must be uint8"):
            writer.write("ok", np.zeros((1, 2, 2, 3), np.float32), good["intrinsics"], good["w2c"])
        with pytest.raises(ValueError, match=r"views \[0\] is not a rotation"):
            writer.write("ok", good["images"], good["intrinsics"], 2 * good["w2c"])
        writer.write("ok", **good)
        with pytest.raises(ValueError, match="duplicate"):
            writer.write("ok", **good)
    with TokenWriter(str(tmp_path / "t")) as writer:
        with pytest.raises(ValueError, match="uint16 or uint32"):
            writer.write("t", np.arange(4, dtype=np.int64), {})
        with pytest.raises(ValueError, match="token id 300 >= vocab_size 257"):
            writer.write("t", np.array([1, 300], dtype=np.uint16), {"vocab_size": 257})
    assert writer.shards == []  # nothing written: no empty shard left behind
