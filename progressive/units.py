"""Units: durations, memory sizes, Slurm's elapsed times, and timestamps, in one format each.

Pure functions, no dependencies beyond the standard library: the config models, the
trainer, the Slurm backend and the run record all read and write these through here.
"""

from __future__ import annotations

import math
import re
import time

__all__ = ["TIME_FORMATS", "MEM_FORMATS", "parse_duration_min", "parse_seconds", "parse_mem_mb", "hms", "now_iso"]

_DURATION_UNITS = {"s": 1 / 60, "m": 1, "h": 60, "d": 1440}
_UNIT_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_SLURM_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
TIME_FORMATS = '"4h", "90m", "2h30m", "45s", "1-12:00:00", "08:00:00" or "MM" minutes'


def parse_duration_min(value: str | int | float) -> int:
    """Parse a time limit into whole minutes (rounded up, at least 1).

    Accepts unit strings ("4h", "90m", "2h30m", "30s", "1d"), Slurm's forms
    ("1-12:00:00", "08:00:00", "1-12", "MM:SS") and bare numbers (minutes, as sbatch does).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as {TIME_FORMATS}, got {value!r}")
    if isinstance(value, (int, float)):
        minutes = float(value)
    else:
        parsed = _parse_duration_text(value.strip().lower())
        if parsed is None:
            raise ValueError(f"cannot parse {value!r} as a duration; use {TIME_FORMATS}")
        minutes = parsed
    if not math.isfinite(minutes) or minutes <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return max(1, math.ceil(minutes - 1e-9))


def _parse_duration_text(text: str) -> float | None:
    if not text:
        return None
    if _UNIT_RE.sub("", text).strip() == "" and _UNIT_RE.search(text):
        return sum(float(n) * _DURATION_UNITS[u] for n, u in _UNIT_RE.findall(text))
    m = _SLURM_TIME_RE.match(text)
    if not m:
        return None
    days, a, b, c = m.groups()
    d = int(days or 0)
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
    elif c is not None:  # HH:MM:SS
        h, mi, s = int(a), int(b), int(c)
    elif b is not None:  # MM:SS
        h, mi, s = 0, int(a), int(b)
    else:  # MM
        h, mi, s = 0, int(a), 0
    if mi >= 60 and (b is not None or days is not None) or s >= 60:
        return None
    return d * 1440 + h * 60 + mi + s / 60


def parse_seconds(value: str | int | float) -> int:
    """Parse a short delay ("90s", "2m", 90) into whole seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected seconds such as 90 or \"90s\", got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        if not (_UNIT_RE.search(text) and _UNIT_RE.sub("", text).strip() == ""):
            raise ValueError(f"cannot parse {value!r} as seconds; use 90 or \"90s\" or \"2m\"")
        seconds = sum(float(n) * _DURATION_UNITS[u] * 60 for n, u in _UNIT_RE.findall(text))
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"must be >= 0 seconds, got {value!r}")
    return int(round(seconds))


_MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$")
_MEM_FACTORS = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}
MEM_FORMATS = '"24G", "512M", "1.5T" (a bare number means megabytes, as in sbatch)'


def parse_mem_mb(value: str | int) -> int:
    """Parse a memory size into whole megabytes (Slurm's unit)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a memory size such as {MEM_FORMATS}, got {value!r}")
    if isinstance(value, (int, float)):
        mb = float(value)
    else:
        m = _MEM_RE.match(value.strip().lower())
        if not m:
            raise ValueError(f"cannot parse {value!r} as memory; use {MEM_FORMATS}")
        mb = float(m.group(1)) * _MEM_FACTORS[m.group(2)]
    if mb <= 0 or not math.isfinite(mb):
        raise ValueError(f"memory must be positive, got {value!r}")
    return max(1, math.ceil(mb))



def hms(elapsed: str) -> str:
    """Slurm's elapsed time as [D-]H:MM:SS (sacct says 00:01:05, squeue 1:05: both become 0:01:05)."""
    days, _, clock = elapsed.rpartition("-")
    parts = [int(p) for p in clock.split(":") if p.isdigit()]
    if not parts:
        return elapsed
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, sec = parts[-3:]
    return f"{days + '-' if days else ''}{h}:{m:02d}:{sec:02d}"


def now_iso() -> str:
    """Local time, seconds resolution, ISO 8601 with the UTC offset (run records and checkpoints)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
