"""`progressive init`: a commented starter stages.toml (and sweep.toml) for a built-in task.

The files are written for the folder they land in: every path in them is relative to it
(`data/`, `jobs/`, `checkpoints/`), so a wheel user in an empty folder can run the printed
commands as they are. Nothing here imports torch; the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from progressive.atomic import write_text
from progressive.errors import ConfigError


@dataclass(frozen=True)
class Starter:
    """What `init` writes for one task, and the command that makes its data."""

    task: str  # the [model] task
    data: str  # [run].data, relative to the folder
    make_data: str  # the command that writes it
    model_options: str  # the [model.options] table's lines
    stages: tuple[tuple[str, int, int, int], ...]  # (name, bucket, batch_size, epochs)
    metric: str  # what a sweep compares (a key of the task's evaluation)
    sweep_param: str  # one model option a sweep varies, with its values


STARTERS: dict[str, Starter] = {
    "precond": Starter(
        task="progressive.tasks.precond:PreconditionerTask",
        data="data/tiny.h5",
        make_data="progressive data generate -o data/tiny.h5 --sizes 64,128,256 --counts 96,48,32",
        model_options='hidden = 16                      # width of the learned preconditioner\nlayers = 2\n',
        stages=(("tiny_64", 64, 4, 4), ("tiny_128", 128, 4, 3), ("tiny_256", 256, 2, 2)),
        metric="learned_iters",
        sweep_param='"model.options.hidden" = [8, 16]',
    ),
    "seqlm": Starter(
        task="progressive.tasks.seqlm:SequenceLMTask",
        data="data/seq",
        make_data="progressive data generate-seq -o data/seq",
        model_options=('vocab = 16                       # generate-seq\'s default\nd_model = 32\nlayers = 2\n'
                       'heads = 2\nmax_len = 256                    # at least the largest bucket\n'),
        stages=(("seq_64", 64, 16, 4), ("seq_128", 128, 8, 3), ("seq_256", 256, 4, 2)),
        metric="loss",
        sweep_param='"model.options.d_model" = [16, 32]',
    ),
}

GRAPH_FILE = "stages.toml"
SWEEP_FILE = "sweep.toml"


def graph_text(kind: str) -> str:
    """The commented stages.toml for a built-in task (`precond` or `seqlm`)."""
    s = _starter(kind)
    text = f"""# A curriculum of {len(s.stages)} stages, each starting from the previous stage's final weights.
# Paths are relative to this file's folder. Every key: `progressive schema`; what would run: `progressive plan`.
# Make the data first:
#   {s.make_data}

[run]
name = "{s.stages[0][0].split('_')[0]}"                     # the run's folder under jobs/ and checkpoints/
seed = 0
data = "{s.data}"
checkpoints = "checkpoints"
jobs = "jobs"

[slurm]                           # what each stage's job asks Slurm for (--local runs on this machine)
cpus_per_task = 1
mem = "2G"
time = "10m"                      # a stage that needs longer is requeued and resumes from its checkpoint
max_requeues = 3
signal_delay = "30s"              # Slurm warns the job this long before its limit: it checkpoints then
# partition = "gpu"
# gpus_per_node = 1               # 0 (the default) trains on the CPU

[train]
lr = 3e-3
warmup_frac = 0.1
checkpoint_every = 20             # optimizer steps
eval_samples = 4                  # held-out samples evaluated at the end of each stage

[model]
task = "{s.task}"

[model.options]
{s.model_options}"""
    for i, (name, bucket, batch, epochs) in enumerate(s.stages):
        text += f"\n[[stage]]\nname = \"{name}\"\nbucket = {bucket}\nbatch_size = {batch}\nepochs = {epochs}\n"
        if i == 0:
            text += 'init_from = "none"                # later stages start from the stage before\n'
    return text


def sweep_text(kind: str) -> str:
    """A commented sweep.toml over `graph_text(kind)`'s stages: 2 learning rates x 2 sizes x 2 curricula."""
    s = _starter(kind)
    names = [name for name, *_ in s.stages]
    curricula = f'[{", ".join(map(_q, names))}], [{_q(names[-1])}]'
    return f"""# A sweep over stages.toml: 2 learning rates x 2 model sizes x 2 curricula = 8 variants.
#   progressive sweep plan
#   progressive sweep submit --local   # or without --local, as Slurm job arrays
[sweep]
name = "{names[0].split('_')[0]}-sweep"
method = "grid"                   # grid | random | tpe
metric = "{s.metric}"{' ' * max(1, 21 - len(s.metric))}# a key of the task's evaluation, of the last stage a variant runs
goal = "min"
parallel = 2                      # variants running at once

[sweep.prune]                     # successive halving at stage boundaries
keep = 0.5

[sweep.params]
"train.lr" = [1e-3, 3e-3]
{s.sweep_param}
"stages" = [{curricula}]   # the curriculum, or the largest bucket alone
"""


def _q(name: str) -> str:
    return f'"{name}"'


def _starter(kind: str) -> Starter:
    try:
        return STARTERS[kind]
    except KeyError:
        raise ConfigError(f"no starter for task {kind!r}", loc="--task",
                          hint=f"choose one of {', '.join(STARTERS)}") from None


def write_starter(folder: Path, kind: str, *, sweep: bool = False, force: bool = False) -> list[Path]:
    """Write stages.toml (and sweep.toml) into `folder`; refuse to replace a file unless `force`."""
    files = {GRAPH_FILE: graph_text(kind), **({SWEEP_FILE: sweep_text(kind)} if sweep else {})}
    existing = [name for name in files if (folder / name).exists()]
    if existing and not force:
        verb = "already exists" if len(existing) == 1 else "already exist"
        raise ConfigError(f"{' and '.join(existing)} {verb}", loc=str(folder.resolve()),
                          hint="edit it, write into another folder, or replace it with --force")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        write_text(folder / name, text)
        written.append(folder / name)
    return written


def next_commands(kind: str, *, sweep: bool = False) -> list[str]:
    """The three commands after `init`: make the data, look at the plan, run it here."""
    last = "progressive sweep submit --local" if sweep else "progressive submit --local"
    return [_starter(kind).make_data, "progressive plan", last]
