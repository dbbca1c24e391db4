"""tpe: Optuna's TPE sampler over a journal file in the sweep folder, driven by the trials' own jobs.

No driver process: a trial's first job asks the study for its parameters (`ensure_drawn`),
rewrites the variant's plan with them and trains; its last stage's job tells the study the
metric (`tell_finished`). A trial whose chain died has no one to report it (the journal has
no heartbeat), so every ask first tells such trials as failed. Optuna is the optional `sweep`
extra, imported here only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from progressive import record
from progressive.errors import ConfigError
from progressive.sweep import record as srecord
from progressive.sweep.record import SweepRecord

JOURNAL_FILE = "optuna.journal"
DEAD = ("failed", "cancelled", "timeout", "blocked")

log = logging.getLogger("progressive.sweep.tpe")


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("method \"tpe\" needs Optuna", loc="[sweep].method",
                          hint="pip install 'progressive[sweep]', or use method = \"random\"") from None
    return optuna


def study(rec: SweepRecord, seed_offset: int = 0) -> Any:
    """The sweep's study on its journal file (created on first use)."""
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4
        from optuna.storages import JournalFileStorage as JournalFileBackend  # type: ignore[attr-defined, no-redef]
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(Path(rec.sweep_dir) / JOURNAL_FILE)))
    # Each trial's job builds its own sampler: seed it per trial, or every job's random start-up
    # draws would be the same.
    sampler = optuna.samplers.TPESampler(seed=rec.seed + seed_offset)
    return optuna.create_study(study_name=rec.name, storage=storage, sampler=sampler, load_if_exists=True,
                               direction="minimize" if rec.goal == "min" else "maximize")


def distributions(rec: SweepRecord) -> dict[str, Any]:
    """Optuna distributions of the sweep's parameters, from the sweep file kept in the record."""
    optuna = _optuna()
    from progressive.sweep.config import Range, parse_sweep

    sweep = parse_sweep(rec.sweep_text, rec.sweep_path).sweep
    out: dict[str, Any] = {}
    for key, spec in sweep.params.items():
        if isinstance(spec, Range):
            if spec.type == "int":
                out[key] = optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.log)
            else:
                out[key] = optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log)
        else:
            out[key] = optuna.distributions.CategoricalDistribution(spec)
    return out


def tell_dead(rec: SweepRecord, st: Any) -> None:
    """Tell every running trial whose variant's chain died as failed."""
    from progressive.sweep.summary import stage_states

    optuna = _optuna()
    states = stage_states(rec)
    running = {t.number for t in st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    for v in rec.variants:
        if v.trial is None or v.trial not in running:
            continue
        if any(s in DEAD for s, _ in states[v.name].values()):
            st.tell(v.trial, state=optuna.trial.TrialState.FAIL)
            log.info("trial %d (%s) told as failed: its chain died", v.trial, v.name)


def ensure_drawn(rec: SweepRecord, variant: str) -> None:
    """Draw the variant's parameters (once, at its first job) and rewrite its plan with them."""
    from progressive.config import parse_config
    from progressive.data.counts import plan_counts
    from progressive.plan import build_plan
    from progressive.sweep.expand import variant_config

    with record.locked(rec.sweep_dir):
        rec = srecord.load(rec.sweep_dir)
        v = rec.variant(variant)
        if v.params is not None:
            return
        st = study(rec, seed_offset=v.index)
        tell_dead(rec, st)
        trial = st.ask(distributions(rec))
        params = dict(trial.params)
        run = record.load(rec.run_dir(variant))
        import tomllib

        raw = tomllib.loads(run.config_text)
        paths = _paths(rec, run)
        cfg = variant_config(raw, params, name=variant, paths=paths, source=rec.sweep_path)
        base = parse_config(run.config_text, run.config_path)  # the graph as written: what its count index was made for
        run.plan = build_plan(cfg, run.config_path, run_name=variant,
                              counts=lambda p: plan_counts(p, buckets=[s.bucket for s in base.stage], task=base.model.task,
                                                           options=base.model.options, config=run.config_path))
        record.save(run)
        v.params, v.trial = params, trial.number
        srecord.save(rec)
        log.info("trial %d (%s) drew %s", trial.number, variant, params)


def _paths(rec: SweepRecord, run: record.RunRecord) -> Any:
    from progressive.sweep.expand import SweepPaths

    return SweepPaths(Path(run.config_path), Path(rec.sweep_dir), Path(run.plan.checkpoint_root).parent,
                      Path(run.plan.data_path), Path(run.plan.data_path))


def tell_finished(rec: SweepRecord, variant: str) -> Optional[float]:
    """After the variant's last stage: tell its trial the metric (or failed when it has none)."""
    from progressive.sweep.summary import metric_of, stage_eval

    optuna = _optuna()
    with record.locked(rec.sweep_dir):
        rec = srecord.load(rec.sweep_dir)
        v = rec.variant(variant)
        if v.trial is None:
            return None
        run = record.load(rec.run_dir(variant))
        value = metric_of(stage_eval(run.plan.stages[-1].metrics_path), rec.metric)
        st = study(rec)
        if value is None:
            st.tell(v.trial, state=optuna.trial.TrialState.FAIL)
        else:
            st.tell(v.trial, value)
        return value


def tell_pruned(rec: SweepRecord, variants: list[str]) -> None:
    """Tell the pruned variants' trials as pruned (the caller holds the sweep lock)."""
    optuna = _optuna()
    st = study(rec)
    for name in variants:
        trial = rec.variant(name).trial
        if trial is not None:
            st.tell(trial, state=optuna.trial.TrialState.PRUNED)
