"""Peak resident memory of one call, for memory-growth tests (Linux).

The process's high-water mark (VmHWM) is reset to the current RSS through /proc/self/clear_refs before the
call, so allocations made earlier (imports, byte-compilation, inputs) never mask the call's own peak.
"""

from __future__ import annotations

from collections.abc import Callable


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_increase_kib(fn: Callable[[], object]) -> int:
    """Peak RSS during fn() minus the RSS just before it, in KiB."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return _status_kib("VmHWM") - before
