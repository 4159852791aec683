"""Readers for the three shard formats, and the loaders that batch them (webdataset ``WebLoader``).

Datasets (one per modality; each sample is a dict of tensors plus ``key`` and ``shard`` strings):

- :func:`scene_dataset`: ``images`` uint8 ``[V, H, W, 3]``, ``intrinsics`` float32 ``[V, 4]``
  (fx, fy, cx, cy in pixels), ``w2c`` float32 ``[V, 4, 4]`` (OpenCV world-to-camera);
- :func:`token_dataset`: ``tokens`` int64 ``[L]``, ``meta`` dict;
- :func:`video_dataset`: ``frames`` uint8 ``[T, H, W, 3]`` or ``latents`` float16 ``[C, T, h, w]``,
  ``caption`` str.

Loaders: :func:`train_loader` cuts the endless resampled stream into epochs of exactly
``batches_per_epoch`` batches on every rank (DDP hangs when ranks disagree); :func:`val_loader` runs one
exact pass; :class:`CurriculumReader` switches the training shards with the step (a curriculum).
``iter_scenes`` / ``iter_tokens`` / ``iter_videos`` are the one-process shortcut for scripts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from datamodules.formats import decode_scene, decode_tokens, decode_video
from datamodules.shards import ShardReader


def scene_dataset(
    shards,
    *,
    train: bool,
    num_views: int | None = None,
    image_size: tuple[int, int] | None = None,
    **reader_kwargs,
) -> ShardReader:
    """Scene samples; ``num_views`` and ``image_size`` = (H, W), when given, are required exactly.
    ``reader_kwargs`` go to :class:`ShardReader` (seed, rank, world_size, max_bad_samples, ...)."""
    decode = functools.partial(decode_scene, num_views=num_views, image_size=image_size)
    return ShardReader(shards, decode, train=train, name="scenes", **reader_kwargs)


def token_dataset(
    shards, *, train: bool, length: int | None = None, vocab_size: int | None = None, **reader_kwargs
) -> ShardReader:
    """Token samples; ``length`` (``seq_len + 1`` for packed sequences), when given, is required exactly;
    ids must be below ``vocab_size`` (the model's) when given, and below meta.json's ``vocab_size``."""
    decode = functools.partial(decode_tokens, length=length, vocab_size=vocab_size)
    return ShardReader(shards, decode, train=train, name="tokens", **reader_kwargs)


def video_dataset(
    shards,
    *,
    train: bool,
    field: str = "frames",
    shape: Sequence[int | None] | None = None,
    **reader_kwargs,
) -> ShardReader:
    """Video samples with ``field`` = "frames" or "latents"; ``shape`` (None = any size) is checked."""
    decode = functools.partial(decode_video, field=field, shape=shape)
    return ShardReader(shards, decode, train=train, name="videos", **reader_kwargs)


def collate(samples: list[dict]) -> dict:
    """Stack tensors of equal shape along a new batch dim; gather strings and dicts into lists."""
    batch = {}
    for name, first in samples[0].items():
        values = [s[name] for s in samples]
        if isinstance(first, torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                keys = [s.get("key") for s in samples]
                raise ValueError(
                    f"cannot batch {name!r} of shapes {sorted(shapes)} (samples {keys}); "
                    "give the reader a fixed shape or use batch_size=None"
                )
            if all(
                v.device.type == "cpu" and not v.requires_grad and v.dtype != torch.bfloat16 for v in values
            ):
                # numpy copies on one thread; torch.stack would wake the intra-op thread pool, which in
                # the main process (num_workers=0) competes with the training step (10-100x slower).
                batch[name] = torch.from_numpy(np.stack([v.numpy() for v in values]))
            else:
                batch[name] = torch.stack(values)
        else:
            batch[name] = values
    return batch


class CurriculumReader(torch.utils.data.IterableDataset):
    """A training stream that changes its shards with the training step: a curriculum over the data.

    ``stages`` is a list of ``(until, reader)``: a pass whose epoch (``set_epoch``; the DataModules pass the
    trainer's global step when the pass starts) is below ``until`` reads that stage's reader, the first such
    stage in the list; the last stage has ``until=None`` and reads every later pass. The stage is a function of
    the pass's epoch alone, so a resumed run (which replays the pass's seed) reads the same stage as the
    uninterrupted run. A stage switches at pass boundaries only: the first pass that starts at or after
    ``until`` reads the next stage.
    """

    def __init__(self, stages: Sequence[tuple[int | None, ShardReader]]):
        super().__init__()
        untils = [until for until, _ in stages]
        if not stages or untils[-1] is not None or any(u is None for u in untils[:-1]):
            raise ValueError(f"CurriculumReader: the last stage (only) must have until=None, got {untils}")
        if any(not r.train for _, r in stages):
            raise ValueError("CurriculumReader: every stage needs a reader built with train=True")
        self.stages, self.train, self.epoch = list(stages), True, 0

    def active(self) -> ShardReader:
        """The reader of the stage that the current epoch falls in."""
        return next(r for until, r in self.stages if until is None or self.epoch < until)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for _, reader in self.stages:
            reader.set_epoch(epoch)

    def set_position(self, batches: int, batch_size: int | None) -> None:
        for _, reader in self.stages:
            reader.set_position(batches, batch_size)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.active())


def _batched(dataset: ShardReader, batch_size: int | None, partial: bool):
    if batch_size is None:
        return dataset
    return wds.DataPipeline(dataset, wds.batched(batch_size, collation_fn=collate, partial=partial))


class TrainLoader(wds.WebLoader):
    """An endless resampled stream cut into epochs of exactly ``batches_per_epoch`` batches.

    Before each pass it calls ``dataset.set_epoch(epoch_fn())`` (default: the number of passes so far),
    in the main process, so the workers started for that pass draw a fresh, reproducible stream.

    Resumable (Lightning saves ``state_dict()`` in checkpoints and calls ``load_state_dict()`` before
    iterating): the state is the seed of the current pass and the number of its batches consumed,
    ``position_fn()`` (the DataModules pass the fit loop's count; default: batches this loader yielded).
    After ``load_state_dict`` the next pass replays that pass from that batch on: the same batches, in the
    same order, as the uninterrupted run (see datamodules/README.md, "Exact resume").
    """

    def __init__(
        self,
        dataset: ShardReader | CurriculumReader,
        *,
        batch_size: int | None,
        batches_per_epoch: int,
        num_workers: int = 0,
        epoch_fn: Callable[[], int | None] | None = None,
        position_fn: Callable[[], int | None] | None = None,
        **loader_kwargs,
    ):
        if not dataset.train:
            raise ValueError("TrainLoader needs a dataset built with train=True (resampled)")
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        pipeline = _batched(dataset, batch_size, partial=False)
        super().__init__(pipeline, batch_size=None, num_workers=num_workers, **loader_kwargs)
        self.with_epoch(batches_per_epoch)
        # Not named `dataset`: Lightning warns about IterableDatasets with a length when it finds one.
        self.reader, self.batches_per_epoch, self.epoch_fn = dataset, batches_per_epoch, epoch_fn
        self.batch_size, self.position_fn = batch_size, position_fn
        self.passes, self.pass_seed, self.yielded = 0, None, 0
        self._resume: dict | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict:
        position = self.position_fn() if self.position_fn is not None else None
        return {"pass_seed": self.pass_seed, "batches": self.yielded if position is None else int(position)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)

    def __iter__(self) -> Iterator:
        resume, self._resume = self._resume, None
        if resume is not None and resume.get("pass_seed") is not None and resume["batches"] < len(self):
            seed, skip = int(resume["pass_seed"]), int(resume["batches"])
        else:  # a fresh pass (also when the checkpoint was taken at the end of a pass)
            epoch = self.epoch_fn() if self.epoch_fn is not None else None
            seed, skip = (self.passes if epoch is None else epoch), 0
        self.passes += 1
        self.pass_seed = seed
        self.reader.set_epoch(seed)
        self.reader.set_position(skip, self.batch_size)
        self.nsamples = self.batches_per_epoch - skip  # what with_epoch counts
        self.yielded = skip
        return self._count(super().__iter__())

    def _count(self, batches: Iterator) -> Iterator:
        for batch in batches:
            self.yielded += 1
            yield batch


def train_loader(
    dataset: ShardReader | CurriculumReader,
    *,
    batch_size: int | None,
    batches_per_epoch: int,
    num_workers: int = 0,
    epoch_fn: Callable[[], int | None] | None = None,
    position_fn: Callable[[], int | None] | None = None,
    **loader_kwargs,
) -> TrainLoader:
    """Training loader: ``batches_per_epoch`` full batches per epoch on every rank (``len()`` says so).

    ``epoch_fn`` returns the seed of the next pass; the DataModules pass the trainer's global step, so a
    run resumed at an epoch boundary replays exactly the stream it would have seen; ``position_fn``
    returns the batches of the current pass consumed so far (saved by ``state_dict``, for mid-pass resume).
    ``loader_kwargs`` go to torch's DataLoader (pin_memory, prefetch_factor, ...).
    """
    return TrainLoader(
        dataset,
        batch_size=batch_size,
        batches_per_epoch=batches_per_epoch,
        num_workers=num_workers,
        epoch_fn=epoch_fn,
        position_fn=position_fn,
        **loader_kwargs,
    )


def val_loader(
    dataset: ShardReader, *, batch_size: int | None, num_workers: int = 0, **loader_kwargs
) -> wds.WebLoader:
    """One exact pass (the last batch may be smaller); ranks can get different numbers of batches,
    so log validation metrics per epoch (``sync_dist`` at epoch end), not per step."""
    if dataset.train:
        raise ValueError("val_loader needs a dataset built with train=False (one exact pass)")
    return wds.WebLoader(
        _batched(dataset, batch_size, partial=True), batch_size=None, num_workers=num_workers, **loader_kwargs
    )


def iter_scenes(shards, *, num_views=None, image_size=None, max_bad_samples: int = 16) -> Iterator[dict]:
    """Every scene of ``shards`` once, in order, in this process (no ranks, no workers)."""
    return iter(
        scene_dataset(
            shards,
            train=False,
            num_views=num_views,
            image_size=image_size,
            rank=0,
            world_size=1,
            max_bad_samples=max_bad_samples,
        )
    )


def iter_tokens(shards, *, length=None, max_bad_samples: int = 16) -> Iterator[dict]:
    """Every token sequence of ``shards`` once, in order, in this process."""
    return iter(
        token_dataset(
            shards, train=False, length=length, rank=0, world_size=1, max_bad_samples=max_bad_samples
        )
    )


def iter_videos(shards, *, field="frames", shape=None, max_bad_samples: int = 16) -> Iterator[dict]:
    """Every video of ``shards`` once, in order, in this process."""
    return iter(
        video_dataset(
            shards,
            train=False,
            field=field,
            shape=shape,
            rank=0,
            world_size=1,
            max_bad_samples=max_bad_samples,
        )
    )
