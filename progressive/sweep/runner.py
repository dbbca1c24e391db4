"""Sweeps, the write side: submit the variants (Slurm arrays, or here), resume, cancel.

Every variant is written as its own run record (`jobs/<sweep>/<variant>/run.json`, the plan
its jobs read back) before anything is submitted; then the arrays, stage by stage, each
`aftercorr` its parent array; with pruning, a small decision job after each stage's arrays
(`afterany`), which the next arrays also wait for; last, a small job that writes the summary.
Submit returns as soon as sbatch has answered: no process stays behind on the login node.
Nothing here imports torch.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from progressive import atomic, record
from progressive.errors import RunError
from progressive.layout import is_complete
from progressive.plan import Plan, StagePlan, missing_inputs
from progressive.record import RunRecord, StageRecord, Submission
from progressive.states import RUNNING_OR_QUEUED
from progressive.units import now_iso
from progressive.sweep import record as srecord
from progressive.sweep import slurm_array
from progressive.sweep.config import SweepTable
from progressive.sweep.expand import SweepPaths, VariantPlan
from progressive.sweep.record import ArrayRecord, PruneRecord, SweepRecord, VariantRecord


def subset_counts(counts: Mapping[int, Mapping[str, int]], max_samples: int) -> dict[int, dict[str, int]]:
    """The counts `progressive data subset --max-samples` makes of a file with `counts` (plan shows them before it exists)."""
    from progressive.data.ops import split_counts
    from progressive.plan import SPLITS

    strata = [(n, s) for n in sorted(counts) for s in SPLITS]
    total = sum(int(counts[n].get(s, 0)) for n, s in strata)
    shares = split_counts(min(max_samples, total), [int(counts[n].get(s, 0)) / total for n, s in strata]) if total else [0] * len(strata)
    out: dict[int, dict[str, int]] = {}
    for (n, s), m in zip(strata, shares):
        out.setdefault(n, {})[s] = m
    return out


@dataclass
class Layout:
    """The Slurm side of a sweep as planned: its arrays and scripts (dependencies symbolic)."""

    arrays: list[slurm_array.ArraySpec]
    scripts: dict[str, str]
    dependencies: dict[str, Optional[str]]


def plan_layout(sweep: SweepTable, paths: SweepPaths, vplans: list[VariantPlan]) -> Layout:
    """The arrays of a fresh submit, their scripts, and their dependencies as `aftercorr:<a0>` (for plan and submit)."""
    specs = slurm_array.layout((vp.variant.name, vp.variant.index, vp.plan.stages) for vp in vplans)
    scripts = {s.key: slurm_array.render(sweep.name, paths.sweep_dir, s, s.tasks, sweep.parallel,
                                         slurm_array.entry("stage", str(paths.sweep_dir), s.key)) for s in specs}
    deps: dict[str, Optional[str]] = {}
    for s in specs:
        parts = [f"aftercorr:<{s.parent}>"] if s.parent else []
        if sweep.prune and s.step > 0:
            parts.append(f"afterany:<prune{s.step - 1}>")
        deps[s.key] = ",".join(parts) or None
    return Layout(specs, scripts, deps)


# ------------------------------------------------------------------ submit

def submit(sweep: SweepTable, paths: SweepPaths, vplans: list[VariantPlan], *, config_text: str, sweep_text: str,
           sweep_path: str, local: bool, replan: Callable[[], list[VariantPlan]]) -> SweepRecord:
    """Write every variant's run record and the sweep record, then submit the arrays (or leave it to run_local).

    Refuses (nothing written) when the sweep already exists, inputs are missing, or a local
    stage wants several processes. `replan` rebuilds the plans once a subset file exists.
    If any sbatch fails, the jobs submitted are cancelled and the sweep's records removed.
    """
    from progressive.backends.local import this_runner
    from progressive.backends.slurm import slurm_available

    if srecord.path(paths.sweep_dir).is_file():
        raise RunError(f"sweep {sweep.name!r} already exists", loc=str(paths.sweep_dir),
                       hint=f"continue it with `progressive sweep resume {sweep.name}`, or give [sweep].name a new name")
    if sweep.subset:
        if not paths.source_data.is_file():
            raise RunError("cannot submit: the data file does not exist", loc=str(paths.source_data),
                           hint="generate the data (`progressive data generate`)")
    else:
        for vp in vplans:
            problems = missing_inputs(vp.plan)
            if problems:
                raise RunError(f"cannot submit variant {vp.variant.name}: " + "; ".join(problems), loc=sweep_path,
                               hint="generate the data (`progressive data generate`)")
    if local:
        wide = [(vp.variant.name, st.name) for vp in vplans for st in vp.plan.stages if st.world_size > 1]
        if wide:
            raise RunError(f"variant {wide[0][0]} stage {wide[0][1]} asks for several processes", loc="--local",
                           hint="local mode runs one process per stage: set tasks_per_node = 1 and nodes = 1")
    elif not slurm_available():
        raise RunError("Slurm is not available on this machine (no sbatch/srun on PATH)", loc="sweep submit",
                       hint="run the sweep here with `progressive sweep submit --local`")
    created = not paths.sweep_dir.exists()
    submitted: list[str] = []
    try:
        with record.locked(paths.sweep_dir):
            if sweep.subset:
                _make_subset(sweep, paths)
                vplans = replan()
                for vp in vplans:
                    problems = missing_inputs(vp.plan)
                    if problems:
                        raise RunError(f"cannot submit variant {vp.variant.name}: " + "; ".join(problems), loc=sweep_path)
            rec = SweepRecord(
                name=sweep.name, mode="local" if local else "slurm", method=sweep.method, metric=sweep.metric,
                goal=sweep.goal, parallel=sweep.parallel, seed=sweep.seed, prune_keep=sweep.prune.keep if sweep.prune else None,
                created_at=now_iso(), updated_at=now_iso(), sweep_dir=str(paths.sweep_dir),
                config_path=str(paths.config_path), sweep_path=str(Path(sweep_path).resolve()), sweep_text=sweep_text,
                variants=[VariantRecord(name=vp.variant.name, index=vp.variant.index, params=vp.variant.params,
                                        stages=vp.plan.names) for vp in vplans],
                runner=this_runner() if local else None)  # this process runs them next (run_local_sweep)
            runs = {vp.variant.name: _run_record(vp.plan, config_text, local) for vp in vplans}
            for run in runs.values():
                record.save(run)
            srecord.save(rec)
            if not local:
                layout = plan_layout(sweep, paths, vplans)
                _submit_arrays(rec, runs, layout.arrays, sweep.prune is not None, submitted, reason="submit")
                srecord.save(rec)
            return rec
    except BaseException:
        slurm_array_cancel(submitted)
        if created:
            shutil.rmtree(paths.sweep_dir, ignore_errors=True)
        else:
            srecord.path(paths.sweep_dir).unlink(missing_ok=True)
        raise


def slurm_array_cancel(ids: list[str]) -> None:
    """scancel these jobs, if any."""
    if ids:
        from progressive.backends.slurm import cancel

        cancel(ids)


def _make_subset(sweep: SweepTable, paths: SweepPaths) -> None:
    from progressive.data.ops import subset

    assert sweep.subset is not None
    paths.data.parent.mkdir(parents=True, exist_ok=True)
    subset(paths.source_data, paths.data, max_samples=sweep.subset.max_samples, seed=sweep.subset.seed, overwrite=True)


def _run_record(plan: Plan, config_text: str, local: bool) -> RunRecord:
    stages = {st.name: StageRecord(local_state="not started" if local else None) for st in plan.stages}
    return RunRecord(run_name=plan.run_name, mode="local" if local else "slurm", created_at=now_iso(), updated_at=now_iso(),
                     config_path=plan.config_path, config_text=config_text, plan=plan, stages=stages)


def _submit_arrays(rec: SweepRecord, runs: Mapping[str, RunRecord], specs: list[slurm_array.ArraySpec],
                   prune: bool, submitted: list[str], *, reason: str,
                   outside_parent: Mapping[str, str] | None = None) -> None:
    """sbatch the arrays in step order (parents first), a prune job after each step, then the final job.

    `outside_parent`: for arrays following an array not in `specs` (resume), that array's job id.
    """
    ids: dict[str, str] = {}
    steps = sorted({s.step for s in specs})
    prune_ids: dict[int, str] = {}
    script_dir = slurm_array.slurm_dir(rec.sweep_dir)
    script_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
        for s in [s for s in specs if s.step == step]:
            parent_job = ids.get(s.parent) if s.parent in ids else (outside_parent or {}).get(s.key)
            parts = [f"aftercorr:{parent_job}"] if parent_job else []
            if step - 1 in prune_ids:
                parts.append(f"afterany:{prune_ids[step - 1]}")
            dep = ",".join(parts) or None
            n = len(rec.arrays)
            # A fresh submit renders exactly what `sweep plan --dry-run` showed; resume names new arrays apart.
            key = s.key if reason == "submit" else f"a{n}"
            script_path = script_dir / f"{key}.sbatch"
            named = slurm_array.ArraySpec(key, s.step, s.options, s.setup, s.parent, s.tasks)
            atomic.write_text(script_path, slurm_array.render(rec.name, Path(rec.sweep_dir), named, s.tasks, rec.parallel,
                                                              slurm_array.entry("stage", rec.sweep_dir, key)))
            job = slurm_array.sbatch(script_path, dep)
            submitted.append(job)
            ids[s.key] = job
            rec.arrays.append(ArrayRecord(key=key, step=step, tasks={str(i): list(t) for i, t in s.tasks.items()},
                                          parent_job=parent_job, job_id=job, dependency=dep, script=str(script_path),
                                          reason=reason))
            for i, (variant, stage) in s.tasks.items():
                run = runs[variant]
                run.stages.setdefault(stage, StageRecord()).submissions.append(
                    Submission(job_id=f"{job}_{i}", submitted_at=now_iso(), dependency=dep, reason=reason))
        if prune and step < max(steps) and not any(p.step == step and p.decided for p in rec.prunes):
            prune_ids[step] = _submit_small(rec, f"prune{step}", "afterany:" + ":".join(
                ids[s.key] for s in specs if s.step == step), ["prune", rec.sweep_dir, str(step)], submitted)
            rec.prunes = [p for p in rec.prunes if p.step != step] + [PruneRecord(step=step, job_id=prune_ids[step])]
    for run in runs.values():
        record.save(run)
    if rec.final_job:
        slurm_array_cancel([rec.final_job])
    # Only jobs Slurm still knows: a dependency on a long-finished (purged) id makes sbatch refuse.
    queued = slurm_array.queued_arrays()
    after = [j for j in ids.values()] + list(prune_ids.values())
    after += [a.job_id for a in rec.arrays if a.job_id and a.job_id not in after and a.job_id in queued]
    rec.final_job = _submit_small(rec, "summary", "afterany:" + ":".join(after), ["finish", rec.sweep_dir], submitted)


def _submit_small(rec: SweepRecord, what: str, dependency: str, args: list[str], submitted: list[str]) -> str:
    first = rec.arrays[0].script if rec.arrays else ""
    options = _options_of(Path(first).read_text() if first else "")
    text = slurm_array.render_small(rec.name, Path(rec.sweep_dir), what, options, slurm_array.entry(*args))
    script = slurm_array.slurm_dir(rec.sweep_dir) / f"{what}.sbatch"
    atomic.write_text(script, text)
    job = slurm_array.sbatch(script, dependency)
    submitted.append(job)
    return job


def _options_of(script: str) -> list[tuple[str, str]]:
    out = []
    for line in script.splitlines():
        if line.startswith("#SBATCH --") and "=" in line:
            k, _, v = line.removeprefix("#SBATCH --").partition("=")
            out.append((k, v))
    return out


# ------------------------------------------------------------------ resume and cancel

@dataclass
class Redo:
    """One stage of one variant that resume submits again."""

    variant: str
    stage: str
    old_job: Optional[str]


def plan_resume(rec: SweepRecord) -> list[Redo]:
    """Stages to submit again: not complete, not live, of variants not pruned (complete ones never rerun)."""
    from progressive.sweep.summary import stage_states

    states = stage_states(rec)
    out: list[Redo] = []
    for v in rec.variants:
        if v.pruned_after:
            continue
        redone = False
        for stage in v.stages:
            state, job = states[v.name][stage]
            if state == "completed":
                continue
            if state in RUNNING_OR_QUEUED and not redone:
                continue
            out.append(Redo(v.name, stage, job))
            redone = True
    return out


def resume(rec: SweepRecord, *, dry_run: bool = False) -> list[Redo]:
    """Resubmit what plan_resume lists: stale live tasks cancelled first, new arrays chained as at submit."""
    with record.locked(rec.sweep_dir):
        rec = srecord.load(rec.sweep_dir)
        redo = plan_resume(rec)
        if dry_run or rec.mode == "local" or not redo:
            return redo
        runs = {v.name: record.load(rec.run_dir(v.name)) for v in rec.variants}
        slurm_array_cancel([r.old_job for r in redo if r.old_job])
        by_variant: dict[str, list[StagePlan]] = {}
        for r in redo:
            by_variant.setdefault(r.variant, []).append(runs[r.variant].plan.stage(r.stage))
        chains = []
        outside: dict[str, str] = {}
        for v in rec.variants:
            if v.name not in by_variant:
                continue
            stages = by_variant[v.name]
            # Steps count from the variant's first stage, so arrays of one step stay comparable for pruning.
            chains.append((v.name, v.index, stages, v.stages.index(stages[0].name)))
        specs = _resume_layout(chains, runs, outside)
        submitted: list[str] = []
        try:
            _submit_arrays(rec, runs, specs, rec.prune_keep is not None, submitted, reason="resume",
                           outside_parent=outside)
            srecord.save(rec)
        except BaseException:
            slurm_array_cancel(submitted)
            raise
        return redo


def _resume_layout(chains: list[tuple[str, int, list[StagePlan], int]], runs: Mapping[str, RunRecord],
                   outside: dict[str, str]) -> list[slurm_array.ArraySpec]:
    """Arrays for the redo stages: the first redo stage of a variant follows nothing, or its parent's live task."""
    arrays: dict[tuple[object, ...], slurm_array.ArraySpec] = {}
    for name, index, stages, first_step in chains:
        where: dict[str, str] = {}
        for k, st in enumerate(stages):
            parent = where.get(st.depends_on[0]) if st.depends_on else None
            live_parent = None
            if parent is None and st.depends_on and not is_complete(runs[name].plan.stage(st.depends_on[0]).final_checkpoint):
                job = runs[name].stages[st.depends_on[0]].job_id
                live_parent = job.split("_")[0] if job else None
            group = (first_step + k, slurm_array.sbatch_options(st), tuple(st.slurm.setup), parent, live_parent)
            spec = arrays.get(group)
            if spec is None:
                spec = arrays[group] = slurm_array.ArraySpec(f"a{len(arrays)}", first_step + k, group[1],
                                                             tuple(st.slurm.setup), parent)
                if live_parent:
                    outside[spec.key] = live_parent
            spec.tasks[index] = (name, st.name)
            where[st.name] = spec.key
    return list(arrays.values())


def cancel(rec: SweepRecord, variants: list[str] | None = None) -> list[str]:
    """scancel the variants' tasks (default: the whole sweep, its prune and summary jobs too); return the ids."""
    names = [v.name for v in rec.variants]
    unknown = [v for v in variants or [] if v not in names]
    if unknown:
        raise RunError(f"no variant named {unknown[0]!r} in sweep {rec.name!r}", loc="--variants",
                       hint=f"valid variants: {', '.join(names)}")
    if rec.mode == "local":
        raise RunError(f"sweep {rec.name!r} runs on this machine", loc="sweep cancel",
                       hint="stop it with Ctrl-C where it runs; continue with `progressive sweep resume`")
    ids: list[str] = []
    if variants is None:
        ids = [a.job_id for a in rec.arrays if a.job_id] + [p.job_id for p in rec.prunes if p.job_id and not p.decided]
        ids += [rec.final_job] if rec.final_job else []
    else:
        for name in variants:
            run = record.load(rec.run_dir(name))
            ids += [s.job_id for s in run.stages.values() if s.job_id]
    slurm_array_cancel(ids)
    return ids
