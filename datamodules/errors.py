"""Errors raised by the shard readers, and the budget that decides when damaged data stops a run.

Damaged data (a truncated or unreadable tar, a sample missing a field, an array of the wrong shape or
dtype, an undecodable image, an empty shard) is reported with a warning naming the shard and the key,
skipped, and counted; once more than ``max_bad`` DISTINCT damaged samples (or shards) are known, the reader
raises :class:`TooManyBadSamplesError` with the count. Meeting the same damage again (the resampled
training stream revisits every shard, validation runs every epoch) neither warns nor counts again, and a
shard with nothing readable in it is not opened again. What is known is shared by every DataLoader worker
of a rank through a :class:`DamageRegistry` (a folder of small records, so worker processes that come
and go with every epoch see it), and the DataModules keep it in their checkpoint state.

A pickle-like entry is never skipped quietly: it raises :class:`UnsafeEntryError` at once, because a shard
that needs unpickling was written by the wrong tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
import weakref


class DataConfigError(ValueError):
    """The data options name nothing usable: a split that is not set, a shard folder that is missing, empty
    or left incomplete by an interrupted import. ``train.py`` prints the message alone, without a traceback."""


class ShardsNotFoundError(DataConfigError, FileNotFoundError):
    """A shard path, pattern or folder that names no existing shard."""


class DamagedSampleError(ValueError):
    """One damaged sample or shard: ``shard`` (path), ``key`` (sample key, or None for the whole shard)."""

    def __init__(self, shard: str, key: str | None, reason: str, unreadable_shard: bool = False):
        # unreadable_shard: nothing of the shard can be read (not a tar, empty, broken before the first
        # sample), so readers skip it for the rest of the run.
        self.shard, self.key, self.reason, self.unreadable_shard = shard, key, reason, unreadable_shard
        where = f"sample {key!r}" if key is not None else "whole shard"
        super().__init__(f"{shard}: {where}: {reason}")


class UnsafeEntryError(RuntimeError):
    """A shard entry whose extension would need unpickling (``.pyd``, ``.pth``, ...); never decoded."""


class TooManyBadSamplesError(RuntimeError):
    """More damaged samples/shards than the configured limit."""


def _record_name(shard: str, key: str | None) -> str:
    return hashlib.sha1(f"{shard}\0{key}".encode()).hexdigest()


class DamageRegistry:
    """The damaged samples and unreadable shards known in a run, shared by processes through a folder.

    Each distinct damage is one file ``<hash of (shard, key)>.json``, linked into place atomically: of several
    DataLoader workers that meet the same damage, exactly one creates it, warns and counts it. An
    unreadable shard also gets ``<hash of shard>.skip``. Without ``path`` a temporary folder is made and
    removed when the creating process drops the registry; pickling (into DataLoader workers) keeps the path.
    """

    def __init__(self, path: str | None = None):
        self._finalizer = None
        if path is None:
            path = tempfile.mkdtemp(prefix="lact-damaged-data-")
            owner = os.getpid()
            # Only the creating process removes it: a forked worker's copy must not.
            self._finalizer = weakref.finalize(self, _remove_if_owner, path, owner)
        self.path = path

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path, self._finalizer = state["path"], None

    def add(self, error: DamagedSampleError) -> bool:
        """Record ``error``; True if it was not known before (the caller warns and counts)."""
        name = os.path.join(self.path, _record_name(error.shard, error.key))
        record = {"shard": error.shard, "key": error.key, "reason": error.reason}
        if error.unreadable_shard:
            record["unreadable_shard"] = True
            with open(os.path.join(self.path, _record_name(error.shard, None) + ".skip"), "w") as f:
                f.write(error.shard)
        # Written whole under a private name, then hard-linked into place: the link is the atomic "create if
        # absent", so no reader ever sees a record half written (nor one left empty by a worker killed at
        # the end of an epoch).
        fd, scratch = tempfile.mkstemp(dir=self.path, suffix=".part")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.link(scratch, name + ".json")
        except FileExistsError:
            return False
        finally:
            os.unlink(scratch)
        return True

    def knows(self, shard: str, key: str | None) -> bool:
        """Whether the damage of sample ``key`` of ``shard`` is already known."""
        return os.path.exists(os.path.join(self.path, _record_name(shard, key) + ".json"))

    def skips(self, shard: str) -> bool:
        """Whether ``shard`` was found unreadable (and is not opened again)."""
        return os.path.exists(os.path.join(self.path, _record_name(shard, None) + ".skip"))

    def count(self) -> int:
        return sum(name.endswith(".json") for name in os.listdir(self.path))

    def records(self) -> list[dict]:
        """Every known damage as ``{"shard", "key", "reason"[, "unreadable_shard"]}``, for checkpoints."""
        out = []
        for name in sorted(os.listdir(self.path)):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(self.path, name)) as f:
                        out.append(json.load(f))
                except (OSError, ValueError):
                    continue  # being written by a worker right now; it is recorded next time
        return out

    def load(self, records: list[dict]) -> None:
        """Add ``records`` (from :meth:`records`) as known, without warnings."""
        for r in records:
            self.add(DamagedSampleError(r["shard"], r["key"], r["reason"], bool(r.get("unreadable_shard"))))


def _remove_if_owner(path: str, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


class ErrorBudget:
    """Counts the distinct damaged samples and shards of a reader and stops the run past ``max_bad``.

    A damage is warned about and counted the first time any process sharing ``registry`` meets it; later
    meetings are silent. With several DataLoader workers the count is the rank's (the workers share the
    registry); without a registry each budget keeps its own.
    """

    def __init__(self, max_bad: int = 16, name: str = "reader", registry: DamageRegistry | None = None):
        if max_bad < 0:
            raise ValueError(f"max_bad must be >= 0, got {max_bad}")
        self.max_bad = max_bad
        self.name = name
        self.registry = registry if registry is not None else DamageRegistry()

    @property
    def count(self) -> int:
        """Distinct damaged samples/shards known so far."""
        return self.registry.count()

    def knows(self, shard: str, key: str | None) -> bool:
        return self.registry.knows(shard, key)

    def skips(self, shard: str) -> bool:
        return self.registry.skips(shard)

    def report(self, error: DamagedSampleError) -> None:
        """Warn about ``error`` and count it if it is new; raise TooManyBadSamplesError once the count
        exceeds max_bad."""
        if not self.registry.add(error):
            return
        count = self.count
        if count > self.max_bad:
            raise TooManyBadSamplesError(
                f"{self.name}: {count} damaged samples/shards, more than max_bad_samples={self.max_bad}; "
                f"the last one: {error}"
            ) from error
        skipped = " (this shard is skipped from now on)" if error.unreadable_shard else ""
        warnings.warn(
            f"{self.name}: skipping damaged data ({count} of at most {self.max_bad}): {error}{skipped}",
            stacklevel=2,
        )
