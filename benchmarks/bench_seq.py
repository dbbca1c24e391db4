"""Sequence-length curriculum payoff: examples/seq.toml (64 -> 128 -> 256 tokens) vs 256 tokens from the start.

Both arms train the same model (SequenceLMTask, d_model 32, 2 layers) with the real trainer on the data of
`progressive data generate-seq` (defaults), for the same number of optimizer steps (288) and the same
number of tokens per step (1024: batch 16 x 64, 8 x 128, 4 x 256), and are evaluated on the same held-out
256-token sequences. The curriculum arm is exactly the example graph; the baseline is one stage on the
256-token bucket for 9 epochs. Wall time is the training of all stages, one thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results" / "seq.md"

from progressive.config import parse_config  # noqa: E402
from progressive.data.arrays import array_counts, read_manifest  # noqa: E402
from progressive.data.seqgen import generate_sequences  # noqa: E402
from progressive.plan import build_plan  # noqa: E402
from progressive.trainer import train_stage  # noqa: E402

BASELINE_STAGES = '[[stage]]\nname = "only_256"\nbucket = 256\nbatch_size = 4\nepochs = 9\ninit_from = "none"\n'


def run_arm(folder: Path, data: Path, seed: int, stages: str | None) -> dict[str, Any]:
    """Train one arm; return the last stage's evaluation, total steps and seconds."""
    text = (REPO / "examples" / "seq.toml").read_text()
    text = text.replace('data = "../data/seq"', f'data = "{data}"').replace("seed = 0", f"seed = {seed}")
    text = text.replace("eval_samples = 32", "eval_samples = 16")  # every held-out 256-token sequence
    if stages is not None:
        text = text[:text.index("[[stage]]")] + stages
    cfg = parse_config(text, source=str(folder / "g.toml"))
    plan = build_plan(cfg, folder / "g.toml", counts=array_counts, run_name=folder.name)
    t0 = time.perf_counter()
    steps, out = 0, None
    for st in plan.stages:
        out = train_stage(plan, st)
        steps += out.step
    assert out is not None and out.metrics
    return {"loss": out.metrics["loss"], "ppl": out.metrics["ppl"], "steps": steps, "s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per arm (model init and data order)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, list[dict[str, Any]]] = {"curriculum 64 -> 128 -> 256": [], "256 only": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "seq"
        generate_sequences(data, lengths=[64, 128, 256], counts=[640, 320, 160], seed=0)
        floor = read_manifest(data)["source"]["entropy_floor"]
        for seed in range(args.seeds):
            for name, stages in (("curriculum 64 -> 128 -> 256", None), ("256 only", BASELINE_STAGES)):
                folder = work / "arms" / f"{name.split()[0]}-{seed}"
                folder.mkdir(parents=True)
                rows[name].append(run_arm(folder, data, seed, stages))
    lines = [
        "## Sequence-length curriculum (SequenceLMTask, examples/seq.toml)",
        "",
        f"Same model, steps (288) and tokens per step (1024); held-out 256-token loss (nats/token), mean over "
        f"{args.seeds} seeds (min-max). Entropy floor of the data: {floor:.2f} nats; uniform: 2.77.",
        "",
        "| arm | steps | val loss @256 | ppl @256 | train seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rs in rows.items():
        losses = [r["loss"] for r in rs]
        lines.append(f"| {name} | {rs[0]['steps']} | {statistics.mean(losses):.3f} ({min(losses):.3f}-{max(losses):.3f}) "
                     f"| {statistics.mean(r['ppl'] for r in rs):.2f} | {statistics.mean(r['s'] for r in rs):.1f} |")
    lines += ["", "Caveat: the curriculum arm also sees more distinct sequences (512 + 256 + 128 training sequences "
              "against the 128 of the 256-token bucket, which the baseline repeats for 9 epochs); at this size "
              "attention's cost per token hardly depends on the length, so the wall times are equal.",
              "", f"Reproduce: `.venv/bin/python benchmarks/bench_seq.py --seeds {args.seeds}`", ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
