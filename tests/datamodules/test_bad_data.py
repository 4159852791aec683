"""Damaged data: each case is reported with shard and key, skipped and counted, and never hangs.

The six cases of the spec: a truncated tar, garbage bytes, a sample missing a required field, an array
of the wrong shape or dtype, an empty shard, a pickle entry. Plus the budget: past max_bad_samples the
run stops with the count, also for an endless training stream over nothing but broken shards.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import tarfile
from functools import partial

import numpy as np
import pytest
from PIL import Image

from datamodules.base import SceneShardDataModule, ShardDataModule, TokenShardDataModule, VideoShardDataModule
from datamodules.errors import TooManyBadSamplesError, UnsafeEntryError
from datamodules.formats import encode_npy
from datamodules.lm import LMDataModule
from datamodules.mqar import MQARDataModule
from datamodules.nvs import NVSDataModule
from datamodules.pos import POSDataModule
from datamodules.readers import iter_scenes, iter_tokens, scene_dataset, token_dataset, val_loader

from .conftest import write_scenes, write_token_shards


def write_tar(path, entries: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def token_entries(key: str, tokens: np.ndarray) -> list[tuple[str, bytes]]:
    return [(f"{key}.tokens.npy", encode_npy(tokens)), (f"{key}.meta.json", b'{"vocab_size": 70000}')]


def keys_and_warnings(shards, **kwargs) -> tuple[list[str], list[str]]:
    with pytest.warns(UserWarning) as caught:
        keys = [s["key"] for s in iter_tokens(shards, **kwargs)]
    return keys, [str(w.message) for w in caught]


def test_truncated_tar_inside_a_sample_names_shard_and_key(tmp_path):
    write_token_shards(tmp_path, 4, 4, length=300)
    shard = tmp_path / "shard-000000.tar"
    data = shard.read_bytes()
    cut = data.index(b"seq_00002.tokens.npy") + 700  # inside the data of seq_00002's tokens
    shard.write_bytes(data[:cut])
    keys, warnings = keys_and_warnings(shard)
    assert keys == ["seq_00000", "seq_00001"]
    (message,) = warnings
    assert f"{shard}: sample 'seq_00002': unreadable tar inside this sample after 2 good samples" in message


def test_tar_cut_between_samples_is_reported_not_silently_short(tmp_path):
    write_token_shards(tmp_path, 4, 4, length=300)
    shard = tmp_path / "shard-000000.tar"
    data = shard.read_bytes()
    # Cut exactly at the header of seq_00002's first entry: tarfile itself sees a well-formed short archive.
    header = data.index(b"seq_00002.") // 512 * 512
    shard.write_bytes(data[:header])
    keys, warnings = keys_and_warnings(shard)
    assert keys == ["seq_00000", "seq_00001"]
    (message,) = warnings
    assert str(shard) in message and "truncated" in message and "after 2 samples" in message


def test_garbage_bytes_shard_is_skipped_with_its_name(tmp_path):
    write_token_shards(tmp_path, 4, 2)  # two good shards
    garbage = tmp_path / "shard-000002.tar"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    keys, warnings = keys_and_warnings(tmp_path)
    assert keys == [f"seq_{i:05d}" for i in range(4)]
    (message,) = warnings
    assert f"{garbage}: whole shard: not a readable tar (ReadError: invalid header)" in message


def test_garbage_bytes_inside_an_image_name_the_key_and_field(scene_shards):
    folder, scenes = scene_shards
    path = folder / "shard-000000.tar"
    entries = []
    with tarfile.open(path) as tar:
        for info in tar:
            data = tar.extractfile(info).read()
            entries.append((info.name, b"not a png at all" if info.name == "scene_0001.002.png" else data))
    write_tar(path, entries)
    with pytest.warns(
        UserWarning, match=r"shard-000000.tar: sample 'scene_0001'.*'002.png' is not a readable image"
    ):
        keys = [s["key"] for s in iter_scenes(folder)]
    assert keys == [k for k in sorted(scenes) if k != "scene_0001"]


def test_sample_missing_a_required_field(tmp_path):
    tokens = np.arange(17, dtype=np.uint16)
    shard = write_tar(
        tmp_path / "s.tar",
        token_entries("good", tokens) + [("lonely.meta.json", b"{}")] + token_entries("after", tokens),
    )
    keys, warnings = keys_and_warnings(shard)
    assert keys == ["good", "after"]
    (message,) = warnings
    assert "s.tar: sample 'lonely': missing required field 'tokens.npy'" in message


def test_scene_missing_a_view_image(scene_shards):
    folder, _ = scene_shards
    path = folder / "shard-000003.tar"  # holds scene_0009 alone
    with tarfile.open(path) as tar:
        entries = [(i.name, tar.extractfile(i).read()) for i in tar if i.name != "scene_0009.001.png"]
    write_tar(path, entries)
    with pytest.warns(UserWarning, match=r"sample 'scene_0009': missing required field '001.png'"):
        assert len(list(iter_scenes(folder))) == 9


@pytest.mark.parametrize(
    "tokens,expected",
    [
        (np.arange(16, dtype=np.uint16), "shape [16], expected [17]"),
        (np.arange(17, dtype=np.int64), "tokens.npy is int64 [17], expected uint16 or uint32"),
        (np.arange(34, dtype=np.uint16).reshape(2, 17), "expected uint16 or uint32 with 1 dims"),
        (np.full(17, 70000, dtype=np.uint32), "token id 70000 >= vocab_size 70000"),
    ],
)
def test_array_of_wrong_shape_or_dtype(tmp_path, tokens, expected):
    good = np.arange(17, dtype=np.uint16)
    shard = write_tar(tmp_path / "s.tar", token_entries("bad", tokens) + token_entries("good", good))
    keys, warnings = keys_and_warnings(shard, length=17)
    assert keys == ["good"]
    (message,) = warnings
    assert "s.tar: sample 'bad'" in message and expected in message


def test_scene_image_that_disagrees_with_its_camera(tmp_path):
    write_scenes(tmp_path, 2, 2, height=6, width=8)
    with pytest.warns(UserWarning) as caught:
        assert list(iter_scenes(tmp_path, num_views=4, max_bad_samples=2)) == []
    assert [str(w.message).split("): ", 1)[1] for w in caught] == [
        f"skipping damaged data ({i + 1} of at most 2): {tmp_path}/shard-000000.tar: sample 'scene_000{i}': "
        "scene has 3 views, expected num_views=4"
        for i in range(2)
    ]


@pytest.mark.parametrize("content", [b"", None], ids=["zero-bytes", "tar-without-samples"])
def test_empty_shard_is_reported(tmp_path, content):
    write_token_shards(tmp_path, 2, 2)
    empty = tmp_path / "shard-000001.tar"
    if content is None:
        write_tar(empty, [])
    else:
        empty.write_bytes(content)
    keys, warnings = keys_and_warnings(tmp_path)
    assert keys == ["seq_00000", "seq_00001"]
    (message,) = warnings
    assert str(empty) in message and ("no samples" in message or "empty file" in message)


@pytest.mark.parametrize("ext", ["pyd", "pickle", "pth", "PT", "pkl"])
def test_pickle_entry_is_refused_before_decoding(tmp_path, ext):
    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (os.system, ("echo unpickled > should_not_exist",))

    payload = pickle.dumps(Boom())
    shard = write_tar(
        tmp_path / "s.tar",
        token_entries("ok", np.arange(17, dtype=np.uint16)) + [(f"evil.data.{ext}", payload)],
    )
    with pytest.raises(
        UnsafeEntryError, match=rf"s.tar: sample 'evil': entry 'evil.data.{ext}' has a pickle-like"
    ):
        list(iter_tokens(shard))
    assert not os.path.exists("should_not_exist")


def test_budget_stops_the_run_with_the_count(tmp_path):
    tokens = np.arange(17, dtype=np.uint16)
    entries = [e for i in range(5) for e in token_entries(f"bad{i}", tokens[:5])]
    shard = write_tar(tmp_path / "s.tar", entries)
    with (
        pytest.warns(UserWarning),
        pytest.raises(TooManyBadSamplesError, match=r"4 damaged samples/shards, more than max_bad_samples=3"),
    ):
        list(iter_tokens(shard, length=17, max_bad_samples=3))
    with pytest.raises(TooManyBadSamplesError, match="1 damaged"):  # limit 0: the first problem stops the run
        list(iter_tokens(shard, length=17, max_bad_samples=0))


def test_endless_training_over_broken_shards_stops_instead_of_spinning(tmp_path):
    write_tar(tmp_path / "a.tar", [])
    (tmp_path / "b.tar").write_bytes(b"\0garbage" * 100)
    stream = iter(token_dataset(tmp_path, train=True, max_bad_samples=20))
    # Each broken shard is counted once (not once per visit); with nothing readable left the run stops.
    with (
        pytest.warns(UserWarning) as caught,
        pytest.raises(TooManyBadSamplesError, match="no readable sample"),
    ):
        next(stream)
    assert len(caught) == 2 and all("skipped from now on" in str(w.message) for w in caught)


def test_damage_inside_a_dataloader_worker_reaches_the_main_process(tmp_path):
    write_scenes(tmp_path, 4, 2)
    (tmp_path / "shard-000001.tar").write_bytes(b"junk" * 300)
    loader = val_loader(scene_dataset(tmp_path, train=False, max_bad_samples=0), batch_size=2, num_workers=2)
    with pytest.raises(Exception, match=r"shard-000001.tar: whole shard: not a readable tar"):
        list(itertools.islice(loader, 10))


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda cam: cam.update(w2c=cam["w2c"][:3]), "view 1: w2c must be a finite 4x4 matrix, got [3, 4]"),
        (lambda cam: cam["w2c"][0].__setitem__(0, 2.0), "view 1: w2c[:3, :3] is not a rotation"),
        (lambda cam: cam.update(w=9), "image 001.png is [6, 8, 3], cameras.json says h=6 w=9"),
        (lambda cam: cam.pop("fy"), "cameras.json view 1 lacks ['fy']"),
    ],
    ids=["w2c-shape", "not-rotation", "size-mismatch", "missing-key"],
)
def test_scene_camera_of_wrong_shape_or_value(scene_shards, change, expected):
    folder, scenes = scene_shards
    path = folder / "shard-000000.tar"
    with tarfile.open(path) as tar:
        entries = [(i.name, tar.extractfile(i).read()) for i in tar]
    for i, (name, data) in enumerate(entries):
        if name == "scene_0002.cameras.json":
            cameras = json.loads(data)
            change(cameras[1])
            entries[i] = (name, json.dumps(cameras).encode())
    write_tar(path, entries)
    with pytest.warns(UserWarning) as caught:
        keys = [s["key"] for s in iter_scenes(folder)]
    assert keys == [k for k in sorted(scenes) if k != "scene_0002"]
    (message,) = [str(w.message) for w in caught]
    assert "shard-000000.tar: sample 'scene_0002'" in message and expected in message


def test_entries_that_are_not_key_dot_field_are_reported(tmp_path):
    good = token_entries("good", np.arange(17, dtype=np.uint16))
    shard = write_tar(tmp_path / "s.tar", [("README", b"hello"), *good, ("x.__key__", b"spoof")])
    keys, warnings = keys_and_warnings(shard)
    assert keys == ["good"]
    assert len(warnings) == 2 and all("entry name is not <key>.<field>" in w for w in warnings)
    assert "sample 'README'" in warnings[0] and "sample 'x.__key__'" in warnings[1]


# ---------------------------------------------------------------- a whole run: distinct damage, once


def test_unreadable_shard_is_skipped_once_for_the_whole_run_across_workers(tmp_path):
    write_token_shards(tmp_path, 8, 4)  # two good shards
    (tmp_path / "shard-000002.tar").write_bytes(b"not a tar" * 100)
    data = TokenShardDataModule(
        train_shards=str(tmp_path), batch_size=2, batches_per_epoch=12, num_workers=2, max_bad_samples=0 + 1
    )
    for _ in range(3):  # three epochs: fresh worker processes each time, every shard revisited many times
        batches = list(data.train_dataloader())
        assert len(batches) == 12
    (record,) = data.state_dict()["damaged"]  # counted once, not per visit nor per worker
    assert record["shard"].endswith("shard-000002.tar") and record["unreadable_shard"]
    resumed = TokenShardDataModule(train_shards=str(tmp_path), batch_size=2, max_bad_samples=1)
    resumed.load_state_dict(data.state_dict())
    assert resumed.damage.skips(record["shard"])  # a resumed run does not open it again


def test_a_damaged_sample_met_again_is_neither_warned_about_nor_counted_again(tmp_path):
    tokens = np.arange(17, dtype=np.uint16)
    shard = write_tar(tmp_path / "s.tar", token_entries("good", tokens) + token_entries("short", tokens[:5]))
    stream = iter(token_dataset(shard, train=True, length=17, max_bad_samples=1))
    with pytest.warns(UserWarning) as caught:
        keys = [next(stream)["key"] for _ in range(30)]
    assert set(keys) == {"good"} and len(caught) == 1


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("fx", 0.0, "fx = 0.0, expected a focal length > 0"),
        ("fy", -3.0, "fy = -3.0, expected a focal length > 0"),
        ("fx", float("nan"), "fx is nan, expected a finite number"),
        ("cy", float("inf"), "cy is inf, expected a finite number"),
    ],
)
def test_bad_intrinsics_are_refused_on_write_import_and_read(tmp_path, scene_shards, field, value, expected):
    from datamodules.camera_json import load_camera_json_scene
    from datamodules.writers import SceneWriter

    from .conftest import random_scene

    scene = random_scene(np.random.default_rng(0))
    scene["intrinsics"][1, ("fx", "fy", "cx", "cy").index(field)] = value
    with pytest.raises(ValueError, match=rf"sample 'bad': views \[1\]: {expected}"):
        SceneWriter(str(tmp_path / "w")).write("bad", **scene)

    # Import: the message names the camera file, the frame and the field.
    folder = tmp_path / "obj"
    folder.mkdir()
    frames = []
    for i in range(2):
        Image.fromarray(scene["images"][i]).save(folder / f"{i}.png")
        fx, fy, cx, cy = (float(v) for v in scene["intrinsics"][i])
        frames.append(
            {"w": 8, "h": 6, "fx": fx, "fy": fy, "cx": cx, "cy": cy,
             "w2c": scene["w2c"][i].tolist(), "file_path": f"{i}.png"}
        )  # fmt: skip
    (folder / "opencv_cameras.json").write_text(json.dumps(frames))
    with pytest.raises(ValueError, match=rf"obj/opencv_cameras.json: frame 1: {expected}"):
        load_camera_json_scene(str(folder))

    # Read: the warning names the shard, the scene and the field (not w2c).
    shards, _ = scene_shards
    path = shards / "shard-000000.tar"
    with tarfile.open(path) as tar:
        entries = [(i.name, tar.extractfile(i).read()) for i in tar]
    for i, (name, data) in enumerate(entries):
        if name == "scene_0001.cameras.json":
            cameras = json.loads(data)
            cameras[1][field] = value
            entries[i] = (name, json.dumps(cameras).encode())  # json writes NaN / Infinity
    write_tar(path, entries)
    with pytest.warns(UserWarning) as caught:
        keys = [s["key"] for s in iter_scenes(path)]
    assert "scene_0001" not in keys
    (message,) = [str(w.message) for w in caught]
    assert f"{path}: sample 'scene_0001': cameras.json view 1: {expected}" in message and "w2c" not in message


def test_an_interrupted_import_leaves_no_folder_the_readers_accept(tmp_path):
    from datamodules.writers import SceneWriter, shard_folder

    from .conftest import random_scene

    out = tmp_path / "scenes"
    folder = shard_folder(str(out))
    partial = folder.__enter__()  # what a killed `prepare` leaves: the with-block never finishes
    with SceneWriter(partial) as writer:
        writer.write("s0", **random_scene(np.random.default_rng(0)))
    assert not out.exists()
    with pytest.raises(
        ValueError, match=r"scenes.incomplete is an interrupted data preparation.*run the prepare"
    ):
        iter_scenes(partial)
    with pytest.raises(ValueError, match="interrupted"):
        iter_scenes(str(partial) + "/*.tar")
    with shard_folder(str(out)) as again, SceneWriter(again) as writer:  # a rerun replaces the leftover
        writer.write("s0", **random_scene(np.random.default_rng(0)))
    assert [s["key"] for s in iter_scenes(out)] == ["s0"] and not os.path.exists(partial)


@pytest.mark.parametrize("with_meta", [False, True])
def test_token_ids_beyond_the_model_vocabulary_name_shard_id_and_vocabulary(tmp_path, with_meta):
    from types import SimpleNamespace

    from torch import nn

    tokens = np.array([1, 2, 300, 4], dtype=np.uint16)
    entries = [("s0.tokens.npy", encode_npy(tokens))]
    if with_meta:
        entries.append(("s0.meta.json", b'{"vocab_size": 1000}'))
    shard = write_tar(tmp_path / "s.tar", entries)
    data = TokenShardDataModule(
        train_shards=shard, val_shards=shard, batch_size=1, num_workers=0, max_bad_samples=0
    )
    # The vocabulary comes from the model being trained (its token embedding), as in a fit.
    model = SimpleNamespace(token_embedding=lambda: nn.Embedding(257, 4))
    data.trainer = SimpleNamespace(lightning_module=model)
    with pytest.raises(
        TooManyBadSamplesError, match=r"s.tar: sample 's0': token id 300 >= the model's vocab_size 257"
    ):
        list(data.val_dataloader())


@pytest.mark.parametrize(
    "make,field",
    [
        (partial(SceneShardDataModule, batch_size=0), "batch_size"),
        (partial(SceneShardDataModule, image_size=(0, 8)), "image_size"),
        (partial(SceneShardDataModule, num_views=-2), "num_views"),
        (partial(TokenShardDataModule, seq_len=0), "seq_len"),
        (partial(VideoShardDataModule, shape=[4, 0, None, 3]), "shape"),
        (partial(ShardDataModule, num_workers=-1), "num_workers"),
        (
            partial(ShardDataModule, batches_per_epoch=0),
            "batches_per_epoch",
        ),
        (partial(NVSDataModule, image_size=0), "image_size"),
        (partial(NVSDataModule, num_input_views=0), "num_input_views"),
        (partial(NVSDataModule, val_batch_size=-1), "val_batch_size"),
        (partial(LMDataModule, train_shards="x", seq_len=-5), "seq_len"),
        (partial(LMDataModule, train_shards="x", batch_size=0), "batch_size"),
        (partial(MQARDataModule, batch_size=0), "batch_size"),
        (partial(POSDataModule, batch_size=0), "batch_size"),
    ],
)
def test_zero_or_negative_sizes_fail_at_construction_naming_the_field(make, field):
    with pytest.raises(ValueError, match=rf"{field} must be"):
        make()
