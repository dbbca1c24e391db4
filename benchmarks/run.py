"""Run the benchmarks and assemble benchmarks/RESULTS.md from benchmarks/results/*.md.

    .venv/bin/python benchmarks/run.py            # every benchmark, then assemble
    .venv/bin/python benchmarks/run.py cli data   # some, then assemble
    .venv/bin/python benchmarks/run.py --assemble # only assemble what is there

Each bench_<name>.py writes its own section to benchmarks/results/<name>.md with the
command that reproduces it; this file only orders and joins them.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["cli", "data", "train", "seq", "slurm", "calibrate"]


def main(argv: list[str]) -> int:
    assemble_only = "--assemble" in argv
    names = [a for a in argv if not a.startswith("--")] or ORDER
    if not assemble_only:
        for name in names:
            script = HERE / f"bench_{name}.py"
            if not script.is_file():
                print(f"no benchmark {script.name}", file=sys.stderr)
                return 2
            print(f"== {script.name}", flush=True)
            rc = subprocess.call([sys.executable, str(script)])
            if rc:
                return rc
    parts = [
        "# Benchmark results",
        "",
        "Every figure is a ratio against a baseline measured in the same run, on this project's",
        f"machine kind (2 cores, 24 GiB, no GPU; {platform.python_implementation()} {platform.python_version()}).",
        "Each section names the command that reproduces it. Assembled by `benchmarks/run.py`",
        f"on {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    for name in ORDER + sorted(p.stem for p in (HERE / "results").glob("*.md") if p.stem not in ORDER):
        path = HERE / "results" / f"{name}.md"
        if path.is_file():
            parts += [path.read_text().strip(), ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
