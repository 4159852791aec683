"""Shard lists, the rank/worker split, and the streaming reader every modality shares.

``ShardReader`` is the IterableDataset at the head of each reader pipeline. In one process (one rank,
one DataLoader worker) it

1. picks its shards: training (``train=True``) reads all shards for ever, in a fresh random order per
   cycle; validation (``train=False``) visits its share once in order (:func:`split_shards`);
2. reads each tar file itself (:func:`read_tar`) so that every problem names the shard and the key;
3. shuffles raw samples in a small buffer (training only), decodes and checks them with the modality's
   ``decode`` function, skips and counts damaged ones through an :class:`ErrorBudget`.

Randomness comes from one numpy generator seeded by ``(seed, epoch, rank, worker)``: reproducible,
different on every rank and worker, and different every epoch once ``set_epoch`` is called. A transform
that draws random numbers itself (e.g. the views of a scene) asks for ``transform_generator=True`` and gets,
in training, a torch generator per sample seeded by ``(seed, epoch, rank, worker, cycle, key)``
(:func:`visit_generator`): the same sample in the same epoch draws the same numbers in any run, whatever
the process's global RNG has done, and a new draw in every epoch and every visit.
"""

from __future__ import annotations

import glob
import itertools
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence

import braceexpand
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.errors import (
    DamagedSampleError,
    DamageRegistry,
    DataConfigError,
    ErrorBudget,
    ShardsNotFoundError,
    TooManyBadSamplesError,
    UnsafeEntryError,
)
from datamodules.formats import PICKLE_EXTENSIONS
from datamodules.writers import incomplete_folder_error

TAR_END = bytes(2 * tarfile.BLOCKSIZE)  # a complete tar archive ends with two zero blocks


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator whose seed is a well-mixed function of the non-negative integers ``parts``."""
    seed = int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def visit_generator(seed: int, epoch: int, rank: int, worker: int, cycle: int, key: str) -> torch.Generator:
    """The generator of one training visit of sample ``key``: the ``cycle``-th pass over all shards of the
    stream of (``rank``, ``worker``) in the pass seeded by ``epoch`` (the trainer's global step when the
    pass starts, see readers.TrainLoader). A resampled stream meets a sample once per cycle, so repeated
    visits within an epoch (few scenes, long epochs) still draw afresh."""
    return seeded_generator(seed, epoch, rank, worker, cycle, zlib.crc32(key.encode()))


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a brace pattern (``data/shard-{000000..000009}.tar``), a glob, a folder (its
    ``*.tar`` files, sorted) or a list of any of these. Every path must exist; an empty result raises, and so
    does a folder left by an interrupted ``prepare`` (it holds the ``INCOMPLETE`` marker and no meta.json)."""
    if isinstance(spec, (str, os.PathLike)):
        specs = [os.fspath(spec)]
    else:
        specs = [os.fspath(s) for s in spec]
    shards: list[str] = []
    for item in specs:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise ShardsNotFoundError(f"folder {item} holds no *.tar shards")
            shards.extend(found)
            continue
        for path in braceexpand.braceexpand(item):
            if any(c in path for c in "*?["):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise ShardsNotFoundError(f"no shard matches {path!r} (from {item!r})")
                shards.extend(matches)
            elif not os.path.isfile(path):
                raise ShardsNotFoundError(f"shard {path} (from {item!r}) does not exist")
            else:
                shards.append(path)
    if not shards:
        raise ShardsNotFoundError(f"no shards in {spec!r}")
    for folder in sorted({os.path.dirname(os.path.abspath(s)) for s in shards}):
        for candidate in (folder, os.path.dirname(folder)):  # a split folder (train/) inside an import
            problem = incomplete_folder_error(candidate)
            if problem is not None:
                raise DataConfigError(problem)
    return shards


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the explicit values when given, else torch.distributed when initialised,
    else the RANK / WORLD_SIZE environment variables (torchrun), else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError(
            f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})"
        )
    if rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return rank, world_size


def split_shards(
    shards: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[list[str], int, int]:
    """The part of ``shards`` that one (rank, worker) reads in a validation pass.

    Returns ``(my_shards, stride, offset)``: read ``my_shards`` in order and keep the samples whose
    running index ``i`` (counted over those shards) has ``i % stride == offset``. With at least as many
    shards as ``world_size * num_workers`` readers, shards are dealt out round-robin (stride 1); with
    fewer, every reader opens all shards and keeps every ``stride``-th sample, so no reader sits idle.
    Either way each sample is visited exactly once across all ranks and workers.
    """
    if not (0 <= worker < num_workers and 0 <= rank < world_size):
        raise ValueError(f"bad split: rank {rank}/{world_size}, worker {worker}/{num_workers}")
    readers = world_size * num_workers
    reader = rank * num_workers + worker
    if len(shards) >= readers:
        return list(shards[reader::readers]), 1, 0
    return list(shards), readers, reader


def _split_name(name: str) -> tuple[str | None, str | None]:
    """(key, field) of a tar entry: the key ends at the first dot of the file name (webdataset's rule)."""
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None, None
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field


def _check_end_marker(fileobj, offset: int) -> bool:
    # tarfile treats a file that stops exactly between two entries as a complete archive; only the
    # missing end-of-archive blocks reveal that later samples were cut off.
    fileobj.seek(offset)
    return fileobj.read(len(TAR_END)) == TAR_END


def read_tar(shard: str, budget: ErrorBudget) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__shard__", field: bytes, ...}`` of one uncompressed tar shard, in order.

    A truncated or unreadable tar, an entry without an extension, a duplicate field or an empty shard
    is reported to ``budget`` (the partial sample is dropped with it); a shard with nothing readable in it is
    reported as unreadable, and from then on skipped without being opened. An entry with a pickle-like
    extension raises :class:`UnsafeEntryError` before its bytes are even read.
    """
    if budget.skips(shard):
        return
    current: dict | None = None
    count = 0
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                tar.members = []  # stream mode keeps every TarInfo; memory would grow with the shard
                if not info.isreg():
                    continue
                key, field = _split_name(info.name)
                if key is None or field.startswith("__"):  # "__" fields would shadow __key__, __shard__
                    budget.report(DamagedSampleError(shard, info.name, "entry name is not <key>.<field>"))
                    continue
                if field.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS:
                    raise UnsafeEntryError(
                        f"{shard}: sample {key!r}: entry {info.name!r} has a pickle-like extension; "
                        "refusing to decode it (store arrays as .npy)"
                    )
                data = tar.extractfile(info).read()
                if current is None or key != current["__key__"]:
                    if current is not None and not current.get("__bad__"):
                        count += 1
                        yield current
                    current = {"__key__": key, "__shard__": shard}
                if field in current:
                    budget.report(DamagedSampleError(shard, key, f"duplicate entry {info.name!r}"))
                    current["__bad__"] = True
                current[field] = data
            if current is not None and not current.get("__bad__"):
                count += 1
                yield current
            current = None
            if not _check_end_marker(f, tar.offset):
                budget.report(
                    DamagedSampleError(
                        shard, None, f"truncated: the tar stops after {count} samples without its end marker"
                    )
                )
                return
    except (tarfile.TarError, OSError, EOFError) as exn:
        cause = f"{type(exn).__name__}: {exn}"
        if current is not None:
            reason = f"unreadable tar inside this sample after {count} good samples ({cause}); rest of shard skipped"
        elif count == 0:
            reason = f"not a readable tar ({cause})"
        else:
            reason = f"unreadable tar after {count} good samples ({cause}); rest of shard skipped"
        key = current["__key__"] if current else None
        budget.report(DamagedSampleError(shard, key, reason, unreadable_shard=count == 0))
        return
    if count == 0:
        budget.report(DamagedSampleError(shard, None, "shard holds no samples", unreadable_shard=True))


def _to_torch(sample: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in sample.items()}


class ShardReader(IterableDataset):
    """Decoded samples from WebDataset shards for one rank and (inside a DataLoader) one worker.

    Args:
        shards: anything :func:`expand_shards` accepts.
        decode: raw sample (dict of bytes) -> dict of numpy arrays / str; raises DamagedSampleError.
        train: True: an endless, shuffled stream over all shards (resampled in random-order cycles);
            False: one exact, ordered pass over this reader's share (see :func:`split_shards`).
        seed: base seed of the shard choice and the shuffle buffer (training).
        rank, world_size: overrides for tests; default from :func:`dist_info`, read at construction
            (so build readers after torch.distributed is initialised, e.g. in ``*_dataloader()``).
        max_bad_samples: distinct damaged samples/shards skipped before the reader raises (per rank: the
            DataLoader workers share ``registry``).
        shuffle_buffer: raw samples held for shuffling in training (0 = none).
        transform: optional sample -> sample applied after decoding (tensors); must be picklable when
            DataLoader workers are spawned. Its exceptions propagate: a bug is not bad data.
        transform_generator: call ``transform(sample, generator)`` instead, with the sample's
            :func:`visit_generator` in training and None in evaluation, for transforms that draw random
            numbers (never the global RNG, whose state depends on the process's history).
        registry: the known damage (:class:`DamageRegistry`) shared with other readers of the run (the
            DataModules pass theirs); default: a new one for this reader.
    """

    def __init__(
        self,
        shards,
        decode: Callable[[dict], dict],
        *,
        train: bool,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_bad_samples: int = 16,
        shuffle_buffer: int = 0,
        transform: Callable[..., dict] | None = None,
        transform_generator: bool = False,
        name: str = "shards",
        registry: DamageRegistry | None = None,
    ):
        super().__init__()
        self.shards = expand_shards(shards)
        self.decode, self.train, self.seed = decode, train, seed
        self.rank, self.world_size = dist_info(rank, world_size)
        self.max_bad_samples, self.shuffle_buffer = max_bad_samples, shuffle_buffer
        self.transform, self.transform_generator, self.name = transform, transform_generator, name
        self.registry = registry if registry is not None else DamageRegistry()
        self.epoch = 0
        self.skip_batches, self.skip_batch_size = 0, 1

    def set_position(self, batches: int, batch_size: int | None) -> None:
        """Start the next training pass ``batches`` batches (of ``batch_size`` samples; None: unbatched) in,
        as if those had been read: each worker skips the raw samples of its share of them, and worker ids
        are rotated so the DataLoader's round-robin hands out batch ``batches`` first. Used on resume."""
        self.skip_batches, self.skip_batch_size = int(batches), batch_size or 1

    def set_epoch(self, epoch: int) -> None:
        """Seeds the next pass; call before iterating so DataLoader workers receive it."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_as_worker(worker, num_workers)

    def iter_as_worker(self, worker: int, num_workers: int) -> Iterator[dict]:
        """The samples that DataLoader worker ``worker`` of ``num_workers`` yields on this rank."""
        skip = 0
        if self.train and self.skip_batches:
            # Batch b of a pass comes from worker b % W (the DataLoader's round-robin): a pass resumed at
            # batch j starts with worker 0, so worker 0 plays the stream of worker j % W, and so on.
            worker = (worker + self.skip_batches) % num_workers
            skip = len(range(worker, self.skip_batches, num_workers)) * self.skip_batch_size
        where = f"{self.name} (rank {self.rank}/{self.world_size}, worker {worker}/{num_workers})"
        budget = ErrorBudget(self.max_bad_samples, where, self.registry)
        epoch = self.epoch
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        self.epoch += 1  # a reader iterated again in the same process moves on to a fresh stream
        if self.train:
            # Every rank and worker draws from all shards with its own seed: the node and worker split of
            # an endless stream. (Dealing each reader a fixed share instead would leave a reader with one
            # shard, and every batch it makes, stuck on a handful of samples when shards are few.)
            raw = self._shuffled(self._endless(self.shards, rng, budget), rng)
            raw = itertools.islice(raw, skip, None)  # raw, not decoded: skipping costs reading only
        else:
            shards, stride, offset = split_shards(
                self.shards, self.rank, self.world_size, worker, num_workers
            )
            raw = (s for i, s in enumerate(self._in_order(shards, budget)) if i % stride == offset)
            # Known damage is dropped after the split, so every reader keeps the same share of samples.
            raw = (s for s in raw if not budget.knows(s["__shard__"], s["__key__"]))
        for sample in raw:
            try:
                decoded = self.decode(sample)
            except DamagedSampleError as exn:
                budget.report(exn)
                continue
            decoded = _to_torch(decoded)
            if self.transform is None:
                yield decoded
            elif self.transform_generator:
                generator = None
                if self.train:
                    cycle = sample["__cycle__"]
                    generator = visit_generator(self.seed, epoch, self.rank, worker, cycle, sample["__key__"])
                yield self.transform(decoded, generator)
            else:
                yield self.transform(decoded)

    @staticmethod
    def _in_order(shards: list[str], budget: ErrorBudget) -> Iterator[dict]:
        for shard in shards:
            yield from read_tar(shard, budget)

    def _endless(self, shards: list[str], rng: np.random.Generator, budget: ErrorBudget) -> Iterator[dict]:
        # Shards are resampled in cycles: each cycle is a fresh random permutation of all shards, so a
        # reader sees every shard once per cycle (fewer repeats than drawing with replacement). Known damage
        # is dropped before the shuffle buffer; a cycle without one usable sample (every shard unreadable,
        # every sample damaged) stops the run instead of spinning.
        for cycle in itertools.count():
            usable = 0
            for index in rng.permutation(len(shards)):
                for sample in read_tar(shards[index], budget):
                    if budget.knows(shards[index], sample["__key__"]):
                        continue
                    sample["__cycle__"] = cycle  # which pass over all shards: see visit_generator
                    usable += 1
                    yield sample
            if usable == 0:
                skipped = sum(budget.skips(s) for s in shards)
                raise TooManyBadSamplesError(
                    f"{budget.name}: no readable sample left in the {len(shards)} shards ({skipped} unreadable, "
                    f"{budget.count} damaged samples/shards in all; see the warnings); check the shard paths"
                )

    def _shuffled(self, samples: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.integers(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)  # only reached if the stream ends (it does not in training)
        yield from buffer
