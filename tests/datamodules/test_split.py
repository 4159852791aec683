"""Shard lists, the rank x worker split, and the endless training stream."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from datamodules.readers import collate, scene_dataset, token_dataset, train_loader, val_loader
from datamodules.shards import dist_info, expand_shards, split_shards

from .conftest import write_scenes, write_token_shards


def test_shard_lists_from_brace_folder_glob_and_list(scene_shards):
    folder, _ = scene_shards
    everything = [str(folder / f"shard-{i:06d}.tar") for i in range(4)]
    assert expand_shards(folder) == everything
    assert expand_shards(str(folder / "shard-{000000..000003}.tar")) == everything
    assert expand_shards(str(folder / "shard-00000[12].tar")) == everything[1:3]
    assert expand_shards([everything[3], str(folder / "shard-00000{0,1}.tar")]) == [
        everything[3],
        *everything[:2],
    ]
    with pytest.raises(FileNotFoundError, match="shard-000004.tar"):
        expand_shards(str(folder / "shard-{000003..000004}.tar"))


def test_dist_info_overrides_and_checks():
    assert dist_info() == (0, 1)  # no process group in the tests
    assert dist_info(3, 4) == (3, 4)
    with pytest.raises(ValueError, match="both"):
        dist_info(rank=1)
    with pytest.raises(ValueError, match="outside"):
        dist_info(4, 4)


@pytest.mark.parametrize("num_shards", [2, 3, 4, 7, 9])
def test_split_covers_every_shard_sample_exactly_once(num_shards):
    """2 ranks x 2 workers, with fewer shards than readers (sample split) and more (shard split)."""
    samples_per_shard = 5
    seen = Counter()
    for rank, worker in itertools.product(range(2), range(2)):
        mine, stride, offset = split_shards([f"s{i}" for i in range(num_shards)], rank, 2, worker, 2)
        stream = [(shard, j) for shard in mine for j in range(samples_per_shard)]
        seen.update(item for i, item in enumerate(stream) if i % stride == offset)
    assert set(seen) == {(f"s{i}", j) for i in range(num_shards) for j in range(samples_per_shard)}
    assert set(seen.values()) == {1}


@pytest.mark.parametrize("count,per_shard", [(10, 3), (5, 5)])  # 4 shards = one per reader; 1 shard < readers
def test_validation_pass_over_2_ranks_x_2_workers_visits_every_sample_once(tmp_path, count, per_shard):
    scenes = write_scenes(tmp_path, count, per_shard)
    keys = Counter()
    for rank in range(2):
        dataset = scene_dataset(tmp_path, train=False, rank=rank, world_size=2)
        for worker in range(2):
            keys.update(s["key"] for s in dataset.iter_as_worker(worker, 2))
    assert keys == Counter(list(scenes))  # every key exactly once


def test_validation_loader_with_real_workers_visits_every_sample_once(tmp_path):
    seqs = write_token_shards(tmp_path, 11, 2)  # 6 shards, last one holds a single sample
    loader = val_loader(token_dataset(tmp_path, train=False), batch_size=4, num_workers=2)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(seqs) and len(keys) == len(set(keys))
    assert all(b["tokens"].shape[1] == 17 for b in batches)


def test_training_stream_never_ends(tmp_path):
    write_token_shards(tmp_path, 6, 2)  # 6 samples in 3 shards
    stream = iter(token_dataset(tmp_path, train=True, rank=0, world_size=1))
    drawn = [next(stream)["key"] for _ in range(100)]  # far more than the data set holds
    assert len(set(drawn)) == 6


def test_every_rank_gets_the_same_number_of_batches(tmp_path):
    # 5 shards of very different sizes: with 2 ranks, one rank's shards hold far more samples.
    for i, count in enumerate([9, 1, 1, 6, 1]):
        write_token_shards(tmp_path / f"part{i}", count, count, seed=i)
    shards = [str(tmp_path / f"part{i}" / "shard-000000.tar") for i in range(5)]
    for num_workers in (0, 2):
        counts = []
        for rank in range(2):
            dataset = token_dataset(shards, train=True, rank=rank, world_size=2, shuffle_buffer=4)
            loader = train_loader(dataset, batch_size=3, batches_per_epoch=7, num_workers=num_workers)
            assert len(loader) == 7
            for _epoch in range(2):
                batches = list(loader)
                assert all(b["tokens"].shape == (3, 17) for b in batches)
                counts.append(len(batches))
        assert counts == [7, 7, 7, 7], f"num_workers={num_workers}"


def test_training_streams_differ_by_rank_and_epoch_and_repeat_by_seed(tmp_path):
    write_token_shards(tmp_path, 40, 4)

    def first_keys(rank, epoch, seed=0):
        dataset = token_dataset(tmp_path, train=True, rank=rank, world_size=2, seed=seed, shuffle_buffer=8)
        dataset.set_epoch(epoch)
        return [s["key"] for s in itertools.islice(iter(dataset), 12)]

    assert first_keys(0, 0) == first_keys(0, 0)
    assert first_keys(0, 0) != first_keys(1, 0)
    assert first_keys(0, 0) != first_keys(0, 1)
    assert first_keys(0, 0) != first_keys(0, 0, seed=1)


def test_train_loader_reseeds_each_pass_from_epoch_fn(tmp_path):
    write_token_shards(tmp_path, 40, 4)
    step = {"value": 0}
    loader = train_loader(
        token_dataset(tmp_path, train=True, shuffle_buffer=8),
        batch_size=2,
        batches_per_epoch=3,
        epoch_fn=lambda: step["value"],
    )
    first = [b["key"] for b in loader]
    assert [b["key"] for b in loader] == first  # same step, same stream (resume at an epoch boundary)
    step["value"] = 3
    assert [b["key"] for b in loader] != first


def test_collate_refuses_mixed_shapes():
    a = {"tokens": torch.zeros(3), "key": "a"}
    b = {"tokens": torch.zeros(4), "key": "b"}
    with pytest.raises(ValueError, match=r"cannot batch 'tokens'.*\['a', 'b'\]"):
        collate([a, b])
    assert collate([a, a])["key"] == ["a", "a"]


def test_training_reader_visits_every_shard_once_per_cycle(tmp_path):
    for i in range(5):
        write_token_shards(tmp_path / f"p{i}", 1, 1, seed=i)  # 5 shards of one sample each
    shards = [str(tmp_path / f"p{i}" / "shard-000000.tar") for i in range(5)]
    stream = iter(token_dataset(shards, train=True, rank=1, world_size=2))
    tokens = [tuple(next(stream)["tokens"].tolist()) for _ in range(15)]
    cycles = [tokens[i : i + 5] for i in (0, 5, 10)]
    assert all(len(set(cycle)) == 5 for cycle in cycles), "no shard twice within a cycle"
    assert len({tuple(c) for c in cycles}) > 1, "a fresh order each cycle"
