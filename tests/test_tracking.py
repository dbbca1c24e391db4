"""Experiment tracking with the real libraries: W&B offline files read back with W&B's own reader
(`wandb leet inspect --json`), MLflow through MlflowClient on a sqlite store (issue 20).

What is checked: one tracker run per stage across a stop, a SIGKILL that loses logged steps and the
resume that redoes them; every history strictly increasing on the curriculum's global step, with
no step twice; a tracker whose server does not answer leaves training untouched (same final
weights) and says so in `status`; the settings, their sources and the bad-input messages.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from progressive.config import parse_config
from progressive.errors import ConfigError
from progressive.tracking.settings import resolve_tracking
from tests.test_trainer_support import assert_same_weights, final_weights, make_data, make_plan, stage_toml
from tests.util import REPO, run_cli

pytest.importorskip("wandb", reason="the wandb extra is installed by scripts/setup.sh")
pytest.importorskip("mlflow", reason="the mlflow extra is installed by scripts/setup.sh")

STAGES = stage_toml("a", bucket=16, batch_size=4, epochs=2) + stage_toml("b", bucket=36, batch_size=4, epochs=1)
BASE = '[[stage]]\nname = "a"\nbucket = 16\nbatch_size = 2\nepochs = 1\n'


def tracking(uri: str, mode: str = "offline") -> str:
    return f'\n[tracking.wandb]\nmode = "{mode}"\nproject = "p"\n[tracking.mlflow]\ntracking_uri = "{uri}"\n'


def wandb_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of one W&B offline run, as W&B's own reader prints them."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wandb_segments(stage_dir: Path) -> list[tuple[str, str, str, list[int]]]:
    """(run id, group, job type, global steps logged) of each offline run of a stage, oldest first."""
    out = []
    for seg in sorted((stage_dir / "wandb").glob("offline-run-*")):
        if not any(seg.glob("*.wandb")):
            continue  # a job killed before W&B had written anything
        recs = wandb_records(seg)
        run = next(r["run"] for r in recs if r["type"] == "run")
        steps = [int(r["history"]["item"]["global_step"]) for r in recs if r["type"] == "history"]
        out.append((run["run_id"], run.get("run_group", ""), run.get("job_type", ""), steps))
    return out


def mlflow_runs(uri: str, experiment: str = "run") -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    history = {name: [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] for name, r in runs.items()}
    return {"runs": runs, "history": history}


JOB = """
import json, os, signal, sys
from progressive.plan import Plan
from progressive.trainer import train_stage
plan = Plan.model_validate_json(open(sys.argv[1]).read())
stage, how, step = plan.stage(sys.argv[2]), sys.argv[3], int(sys.argv[4])
polls = []
def on_progress(ev):
    if how == "kill" and ev.get("event") == "step" and ev["step"] == step:
        os.kill(os.getpid(), signal.SIGKILL)  # no checkpoint, no tracker close: a node lost mid-step
def stop():
    polls.append(1)
    return how == "stop" and len(polls) >= step
out = train_stage(plan, stage, on_progress=on_progress, stop_requested=stop, device="cpu")
print(json.dumps({"status": out.status, "step": out.step}))
"""


def job(tmp_path: Path, plan: Any, stage: str, how: str = "run", step: int = 0) -> subprocess.CompletedProcess[str]:
    """One job of `stage` in a fresh process, as on a cluster: run it, stop it after `step` steps (as the
    pre-timeout signal would), or SIGKILL it right after it logged `step`."""
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", JOB, str(tmp_path / "plan.json"), stage, how, str(step)], env=env,
                         capture_output=True, text=True, timeout=300)
    expected = -signal.SIGKILL if how == "kill" else 0
    assert res.returncode == expected, res.stderr[-3000:]
    return res


def test_one_tracker_run_per_stage_across_a_stop_a_sigkill_and_resumes_with_no_step_twice(tmp_path: Path) -> None:
    data = make_data(tmp_path / "m.h5")
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    plan = make_plan(tmp_path, data, STAGES, train="checkpoint_every = 2", run=tracking(uri))
    a, b = plan.stages
    assert plan.tracking.step_offsets == {"a": 0, "b": a.total_steps}
    assert '"stopped", "step": 3' in job(tmp_path, plan, "a", "stop", 3).stdout  # saved at 3
    job(tmp_path, plan, "a", "kill", 7)  # saves at 4 and 6 (every 2 steps), killed after logging 7
    assert '"completed"' in job(tmp_path, plan, "a").stdout  # resumes from 6, redoes step 7
    assert '"completed"' in job(tmp_path, plan, "b").stdout

    total_a, total_b = a.total_steps or 0, b.total_steps or 0
    segs = wandb_segments(Path(a.metrics_path).parent)
    # One offline run per job of stage a (the killed one may have died before W&B wrote its file), one W&B run.
    assert 1 <= len(segs) <= 3
    assert len({s[0] for s in segs}) == 1 and all(s[1:3] == ("run", "a") for s in segs)
    logged = [step for seg in segs for step in seg[3]]
    assert logged == list(range(1, total_a + 1))  # contiguous, strictly increasing, nothing twice
    (b_id, _, _, b_steps), = wandb_segments(Path(b.metrics_path).parent)
    assert b_id != segs[0][0] and b_steps == list(range(total_a + 1, total_a + total_b + 1))

    ml = mlflow_runs(uri)
    assert set(ml["runs"]) == {"run", "run.a", "run.b"}
    parent = ml["runs"]["run"].info.run_id
    for stage in ("run.a", "run.b"):
        assert ml["runs"][stage].data.tags["mlflow.parentRunId"] == parent
        assert ml["runs"][stage].info.status == "FINISHED"
        assert ml["runs"][stage].data.params["bucket"] in ("16", "36")
    assert ml["history"]["run.a"] == list(range(1, total_a + 1))
    assert ml["history"]["run.b"] == list(range(total_a + 1, total_a + total_b + 1))
    assert "eval/loss" in ml["runs"]["run.b"].data.metrics
    assert ml["runs"]["run"].info.status == "FINISHED"  # every stage complete: the curriculum run too


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers (a tracking server that hangs)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        srv.close()


def test_a_tracking_server_that_does_not_answer_leaves_training_untouched(tmp_path: Path, silent_server: str) -> None:
    from progressive.trainer import train_stage

    data = make_data(tmp_path / "m.h5")
    stage = stage_toml("a", bucket=16, batch_size=4, epochs=2)
    ref = make_plan(tmp_path / "ref", data, stage)
    (tmp_path / "ref").mkdir()
    train_stage(ref, ref.stages[0], device="cpu")
    (tmp_path / "hung").mkdir()
    plan = make_plan(tmp_path / "hung", data, stage, run=f'\n[tracking.mlflow]\ntracking_uri = "{silent_server}"\n')
    out = train_stage(plan, plan.stages[0], device="cpu")
    assert out.status == "completed"
    assert_same_weights(final_weights(out.checkpoint or ""), final_weights(ref.stages[0].final_checkpoint))
    notes = json.loads((Path(plan.stages[0].metrics_path).parent / "tracking-notes.json").read_text())
    # MLflow gives up after its (lowered) HTTP timeout and one retry (~20 s), and the job's end stops waiting
    # after 20 s: either note, or both, as the two race.
    assert 1 <= len(notes) <= 2 and all(n.startswith((
        "mlflow switched off for this job: open failed: MlflowException",
        "a tracker did not connect within 20 s of the job's end")) for n in notes), notes


def test_submit_local_with_offline_wandb_then_status_and_sync_dry_run(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[run]\nname = "trk"\ndata = "{tiny_dataset}"\n[train]\neval_samples = 0\n'
                   '[model.options]\nhidden = 8\nlayers = 1\nsketch = 4\n'
                   '[tracking.wandb]\nmode = "offline"\n' + BASE)
    plan = run_cli("plan", "-c", str(cfg), cwd=tmp_path, check=True).stdout
    assert ("tracking: W&B project = trk (default), entity = - (default), mode = offline (stages.toml), "
            "group = trk, one run per stage") in " ".join(plan.split())
    run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, check=True)
    status = run_cli("status", "trk", cwd=tmp_path, check=True).stdout
    assert "a: 1 W&B offline run(s) not synced yet: progressive sync trk" in " ".join(status.split())
    dry = run_cli("sync", "trk", "--dry-run", cwd=tmp_path, check=True).stdout
    (seg,) = sorted((tmp_path / "jobs" / "trk" / "stages" / "a" / "wandb").glob("offline-run-*"))
    assert f"would upload jobs/trk/stages/a/wandb/{seg.name}" in dry
    (seg / f"run-{seg.name.rsplit('-', 1)[1]}.wandb.synced").write_text("")  # as wandb sync marks an upload
    assert "nothing to sync" in run_cli("sync", "trk", cwd=tmp_path, check=True).stdout
    assert "not synced" not in run_cli("status", "trk", cwd=tmp_path, check=True).stdout
    bad = run_cli("sync", "nope", cwd=tmp_path)
    assert bad.returncode == 1 and "error: sync: no run or sweep named 'nope' under jobs" in bad.stderr


# --------------------------------------------------------------------------- settings (pure)


def test_a_key_in_stages_toml_wins_over_the_trackers_own_variables_and_plan_says_which(tmp_path: Path) -> None:
    cfg = parse_config(tracking("sqlite:///ml.db") + BASE, source=str(tmp_path / "s.toml"))
    env = {"WANDB_PROJECT": "from-env", "WANDB_MODE": "online", "WANDB_ENTITY": "lab",
           "MLFLOW_TRACKING_URI": "http://x", "MLFLOW_EXPERIMENT_NAME": "exp"}
    t = resolve_tracking(cfg, tmp_path, "run", env, {"a": 3})
    assert t.wandb is not None and t.mlflow is not None
    assert (t.wandb.project, t.wandb.mode, t.wandb.entity) == ("p", "offline", "lab")
    assert t.wandb.sources == {"project": "stages.toml", "entity": "$WANDB_ENTITY", "mode": "stages.toml"}
    assert t.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'ml.db'}"  # relative to the config's folder
    assert (t.mlflow.experiment, t.mlflow.sources["experiment"]) == ("exp", "$MLFLOW_EXPERIMENT_NAME")
    bare = parse_config("[tracking.wandb]\n[tracking.mlflow]\n" + BASE, source="s.toml")
    t = resolve_tracking(bare, tmp_path, "run", env, {"a": 3})
    assert t.wandb is not None and (t.wandb.project, t.wandb.mode) == ("from-env", "online")
    assert t.mlflow is not None and (t.mlflow.tracking_uri, t.mlflow.sources["tracking_uri"]) == ("http://x", "$MLFLOW_TRACKING_URI")
    none = resolve_tracking(bare, tmp_path, "run", {}, {"a": 3})
    assert none.wandb is not None and (none.wandb.project, none.wandb.mode) == ("run", "online")


@pytest.mark.parametrize("text, message, hint", [
    ('[tracking.wandb]\nmod = "offline"\n', "s.toml: [tracking.wandb].mod: unknown key 'mod'", "did you mean 'mode'?"),
    ('[tracking.wandb]\nmode = "of"\n', "s.toml: [tracking.wandb].mode: Input should be 'online', 'offline' or 'disabled'",
     "use one of the values listed above"),
    ("[tracking.neptune]\n", "s.toml: [tracking].neptune: unknown key 'neptune'", "valid keys: mlflow, tensorboard, wandb"),
    ("[tracking.mlflow]\nlog_model = 3\n", "s.toml: [tracking.mlflow].log_model: Input should be a valid boolean", ""),
    (f'[tracking.wandb]\ntags = ["{"x" * 65}"]\n', "s.toml: [tracking.wandb].tags.0: String should have at most 64 characters",
     ""),
])
def test_bad_tracking_tables_get_one_message_naming_the_key(text: str, message: str, hint: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text + BASE, source="s.toml")
    assert str(exc.value).startswith(message)
    assert hint in (exc.value.hint or "")


def test_the_old_train_tensorboard_key_still_works_and_plan_warns(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[run]\ndata = "{tiny_dataset}"\n[train]\ntensorboard = true\n' + BASE)
    out = run_cli("plan", "-c", str(cfg), cwd=tmp_path, check=True).stdout
    flat = " ".join(out.split())
    assert "warning: [train] tensorboard is deprecated: write a [tracking.tensorboard] table instead" in flat
    assert "tracking: TensorBoard event files under each stage's folder" in flat


def test_report_sends_the_transfer_matrix_to_each_stages_tracker_runs(tmp_path: Path, tiny_dataset: Path) -> None:
    pytest.importorskip("matplotlib", reason="report's figures need the report extra")
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[run]\nname = "trk"\ndata = "{tiny_dataset}"\n[train]\neval_samples = 1\n'
                   '[model.options]\nhidden = 8\nlayers = 1\nsketch = 4\nic0 = false\n' + tracking(uri)
                   + BASE + '[[stage]]\nname = "b"\nbucket = 32\nbatch_size = 2\nepochs = 1\n')
    run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, check=True)
    out = run_cli("report", "trk", "--transfer-samples", "1", cwd=tmp_path, check=True).stdout
    assert "transfer matrix sent to W&B (2 stage run(s))" in out
    assert "transfer matrix sent to MLflow (2 stage run(s))" in out
    ml = mlflow_runs(uri, experiment="trk")
    for stage in ("trk.a", "trk.b"):
        metrics = ml["runs"][stage].data.metrics
        assert {"transfer/n16/learned_iters", "transfer/n32/learned_iters"} <= set(metrics), sorted(metrics)
    # W&B offline: the report wrote one more segment of each stage's run, with the row in its summary
    for stage in ("a", "b"):
        segs = sorted((tmp_path / "jobs" / "trk" / "stages" / stage / "wandb").glob("offline-run-*"))
        assert len(segs) == 2 and len({s.name.rsplit("-", 1)[1] for s in segs}) == 1
        summary = [r["summary"] for r in wandb_records(segs[-1]) if r["type"] == "summary"]
        assert any("transfer/n32/learned_iters" in json.dumps(s) for s in summary)


def test_global_step_offsets_count_every_stage_of_the_graph_whatever_is_selected(tmp_path: Path) -> None:
    from progressive.data.format import bucket_counts
    from progressive.plan import build_plan

    data = make_data(tmp_path / "m.h5")
    cfg = parse_config(f'[run]\ndata = "{data}"\n' + tracking("sqlite:///ml.db") + STAGES, source=str(tmp_path / "x.toml"))
    full = build_plan(cfg, tmp_path / "x.toml", counts=bucket_counts)
    only_b = build_plan(cfg, tmp_path / "x.toml", select=["b"], counts=bucket_counts)
    assert full.stages[0].total_steps
    assert only_b.tracking.step_offsets["b"] == full.tracking.step_offsets["b"] == full.stages[0].total_steps


def test_a_mistyped_wandb_mode_in_the_environment_is_one_clear_error(tmp_path: Path) -> None:
    cfg = parse_config("[tracking.wandb]\n" + BASE, source="s.toml")
    with pytest.raises(ConfigError) as exc:
        resolve_tracking(cfg, tmp_path, "run", {"WANDB_MODE": "offlin"}, {"a": 3})
    assert exc.value.msg == "WANDB_MODE='offlin' is not a W&B mode" and exc.value.loc == "$WANDB_MODE"
