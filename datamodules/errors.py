"""Errors raised by the shard readers, and the budget that decides when damaged data stops a run.

Damaged data (a truncated or unreadable tar, a sample missing a field, an array of the wrong shape or
dtype, an undecodable image, an empty shard) is reported with a warning naming the shard and the key,
skipped, and counted; once a reader has seen more than ``max_bad`` such problems it raises
:class:`TooManyBadSamplesError` with the count. A pickle-like entry is never skipped quietly: it raises
:class:`UnsafeEntryError` at once, because a shard that needs unpickling was written by the wrong tool.
"""

from __future__ import annotations

import warnings


class DamagedSampleError(ValueError):
    """One damaged sample or shard: ``shard`` (path), ``key`` (sample key, or None for the whole shard)."""

    def __init__(self, shard: str, key: str | None, reason: str):
        self.shard, self.key, self.reason = shard, key, reason
        where = f"sample {key!r}" if key is not None else "whole shard"
        super().__init__(f"{shard}: {where}: {reason}")


class UnsafeEntryError(RuntimeError):
    """A shard entry whose extension would need unpickling (``.pyd``, ``.pth``, ...); never decoded."""


class TooManyBadSamplesError(RuntimeError):
    """More damaged samples/shards than the configured limit."""


class ErrorBudget:
    """Counts damaged samples and shards for one reading process and stops the run past ``max_bad``.

    Every problem is reported with a warning that carries the running count, so the same damaged shard
    met twice (resampled training) is reported twice. The count is per process: each DataLoader worker
    keeps its own, and a new pass (epoch) with fresh workers starts again from zero.
    """

    def __init__(self, max_bad: int = 16, name: str = "reader"):
        if max_bad < 0:
            raise ValueError(f"max_bad must be >= 0, got {max_bad}")
        self.max_bad = max_bad
        self.name = name
        self.count = 0

    def report(self, error: DamagedSampleError) -> None:
        """Warn about ``error`` and count it; raise TooManyBadSamplesError once the count exceeds max_bad."""
        self.count += 1
        if self.count > self.max_bad:
            raise TooManyBadSamplesError(
                f"{self.name}: {self.count} damaged samples/shards, more than max_bad_samples={self.max_bad}; "
                f"the last one: {error}"
            ) from error
        warnings.warn(
            f"{self.name}: skipping damaged data ({self.count} of at most {self.max_bad}): {error}",
            stacklevel=2,
        )
