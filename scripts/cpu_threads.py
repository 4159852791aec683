"""How many torch threads a CPU demo should train with, shared by scripts/demo_nvs.py, gso_toy_nvs.py and
demo_video.py: one thread when other jobs keep the cores busy (a multi-threaded op then waits for a preempted
thread; one thread degrades gracefully), else whichever of 1 thread and all cores (up to 8) steps faster."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def busy_cores(seconds: float = 2.0) -> float:
    """How many cores other jobs keep busy now: the machine's non-idle CPU time over `seconds` while this
    process sleeps (/proc/stat), or the 1-minute load average where /proc/stat is missing. The load average
    alone would count this script's own data preparation of the last minute."""
    try:

        def times() -> list[int]:
            with open("/proc/stat") as f:
                return [int(x) for x in f.readline().split()[1:]]

        before = times()
        time.sleep(seconds)
        delta = [b - a for a, b in zip(before, times())]
    except (OSError, ValueError):
        return os.getloadavg()[0]
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    return (os.cpu_count() or 1) * (1 - idle / max(sum(delta), 1))


def fastest_threads(requested: int, step_seconds: Callable[[int], float]) -> tuple[int, float]:
    """(threads, seconds per training step): `requested` threads when > 0, else one thread on a busy machine,
    else the faster of 1 thread and all cores (up to 8), timed by `step_seconds(threads)` (wall seconds of
    one training step with that many torch threads)."""
    cores = min(os.cpu_count() or 1, 8)
    if requested > 0:
        candidates = [requested]
    elif (busy := busy_cores()) >= 0.5 * cores:
        print(f"other jobs keep {busy:.1f} of {cores} cores busy: one torch thread", flush=True)
        candidates = [1]
    else:
        candidates = sorted({1, cores})
    timings = {n: step_seconds(n) for n in candidates}
    best = min(timings, key=timings.get)
    print(
        f"torch threads: {', '.join(f'{n}: {t:.2f} s/step' for n, t in timings.items())} -> {best}",
        flush=True,
    )
    return best, timings[best]
