"""`progressive sync RUN|SWEEP`: upload W&B offline runs (see `progressive.tracking.sync`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from progressive.cli.plan_cmds import rel
from progressive.cli.render import console


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the sync command."""
    p = sub.add_parser("sync", help="upload a run's or a sweep's W&B offline runs (oldest first)",
                       description="With [tracking.wandb] mode = \"offline\", each job of a stage writes a W&B "
                       "offline run under jobs/<run>/stages/<stage>/wandb/. This uploads those not yet uploaded, "
                       "with W&B's own `wandb sync`, oldest first, so each job's segment continues the stage's "
                       "one W&B run. Run it where there is internet (a login node), after `wandb login`.")
    p.add_argument("run", metavar="RUN", help="run or sweep name")
    p.add_argument("--jobs", default="jobs", metavar="DIR", help="the jobs folder holding run records (default: jobs)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    p.set_defaults(handler=cmd_sync)


def cmd_sync(args: argparse.Namespace) -> int:
    """Handler of `progressive sync`."""
    from progressive.tracking.sync import pending, sync, target_folder

    folder = target_folder(Path(args.jobs), args.run)
    runs = pending(folder)
    con = console()
    if not runs:
        con.print(f"nothing to sync: no W&B offline run under {rel(folder)} is waiting")
        return 0
    for r in runs:
        con.print(f"{'would upload' if args.dry_run else 'uploading'} {rel(r)}", soft_wrap=True)
    if args.dry_run:
        return 0
    out = sync(runs)
    con.print(out.strip(), soft_wrap=True, markup=False)
    con.print(f"uploaded {len(runs)} offline run(s) of {args.run}")
    return 0
