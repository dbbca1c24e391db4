"""The task interface: what a user plugs into the trainer.

A task owns everything model-specific: building the model from `[model.options]`,
the dataset of one bucket and split, collating samples into a batch, the training
loss of a batch and the evaluation on held-out data. The trainer owns everything
else (optimizer, schedule, precision, checkpoints, resume, DDP, metrics). It is named
in stages.toml as

    [model]
    task = "my_package.my_module:MyTask"
    [model.options]
    hidden = 64

and `load_task(ref, options)` imports `MyTask` and calls `MyTask(**options)`. The
reference task (`progressive.tasks.precond:PreconditionerTask`) is one such class,
not a special case.

Counting: `plan` never imports the task (a task module imports torch and runs the user's
code); it reads sample counts from the data's count index, written by `progressive data
index -c stages.toml`, which asks the task (`count`, else `len(dataset(...))`). See
`progressive.data.counts`.

Rules a task must follow for resume to be exact: draw every random number of the loss
from the `generator` argument (the trainer saves and restores its state), and make
`build_model` depend only on the options and torch's global RNG (the trainer seeds it).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from progressive.errors import ConfigError, ProgressiveError

__all__ = ["Task", "load_task"]


class Task(ABC):
    """A model, its data, its loss and its evaluation, as the trainer sees them.

    Subclasses take their `[model.options]` as keyword arguments in `__init__`. Only
    `build_model`, `loss` and `evaluate` are required; the data hooks default to the
    bucketed HDF5 dataset of `progressive.data`.
    """

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model (the trainer seeds torch's RNG before calling this)."""

    def dataset(self, data_path: str, bucket: int, split: str) -> Dataset[Any]:
        """The samples of one bucket and split (default: `progressive.data.loader.BucketDataset`)."""
        from progressive.data.loader import BucketDataset

        return BucketDataset(data_path, bucket, split)

    def count(self, data_path: str, bucket: int, split: str) -> int | None:
        """How many samples `dataset(data_path, bucket, split)` holds, cheaply; None: "build it and take len()".

        Optional: `progressive data index` and `submit` call it (never `plan`, which does not import
        tasks) before falling back to `len(self.dataset(...))`. Override it when building a dataset
        is expensive (e.g. it reads every file) but its size is cheap to know (a header, a line count).
        Return 0 for a split the data lacks; raise only for data that cannot be read.
        """
        return None

    def collate(self, samples: Sequence[Any]) -> Any:
        """Turn a list of samples into one batch (default: block-diagonal CSR batch)."""
        from progressive.data.loader import collate_block_diag

        return collate_block_diag(list(samples))

    def worker_init_fn(self, worker_id: int) -> None:
        """Run in each DataLoader worker at start (default: the data module's, which reopens files)."""
        from progressive.data.loader import worker_init_fn

        worker_init_fn(worker_id)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """Move a batch to `device` (default: `batch.to(device)`)."""
        return batch.to(device, non_blocking=True) if _accepts_non_blocking(batch) else batch.to(device)

    def batch_len(self, batch: Any) -> int:
        """How many samples a batch holds (for samples/s); default `len(batch.sizes)`."""
        return len(batch.sizes)

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """The scalar training loss of a batch, averaged over its samples.

        Args:
            model: the (possibly DDP-wrapped) model; call it, do not reach into it.
            batch: a batch from `collate`, already on the training device.
            generator: the only source of randomness allowed here, so resume is exact.
        """

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, dataset: Dataset[Any], *, device: torch.device,
                 max_samples: int) -> dict[str, float]:
        """Metrics on held-out data: at most `max_samples` samples of `dataset`, model in eval mode.

        Returns a flat dict of JSON-serialisable numbers; it goes into the stage's final
        checkpoint, the `completed` metrics line and the stage's result table.
        """


def _accepts_non_blocking(batch: Any) -> bool:
    if isinstance(batch, torch.Tensor):
        return True
    try:
        return "non_blocking" in inspect.signature(batch.to).parameters
    except (TypeError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------- loading


def load_task(ref: str, options: dict[str, Any] | None = None) -> Task:
    """Import `"module:object"` and build the task from `options`.

    `object` may be a `Task` subclass or any callable returning a `Task` (called with
    `**options`), or a `Task` instance (then `options` must be empty).

    Raises:
        ConfigError: the module or object does not exist (listing what does), the options
            are not accepted (listing those that are), or the object is not a Task.
    """
    options = dict(options or {})
    loc = "[model].task"
    module_name, sep, attr_path = ref.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"task {ref!r} must look like \"package.module:Object\"", loc=loc,
                          hint="e.g. task = \"progressive.tasks.precond:PreconditionerTask\"")
    module = _import_module(module_name, ref, loc)
    obj: Any = module
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(obj, part):
            where = ".".join([module_name, *attr_path.split(".")[:i]])
            names = _public_names(obj)
            close = difflib.get_close_matches(part, names, n=1)
            hint = (f"did you mean {close[0]!r}? " if close else "") + (
                f"{where} defines: {', '.join(names)}" if names else f"{where} defines no public names")
            raise ConfigError(f"{where} has no attribute {part!r}", loc=loc, hint=hint)
        obj = getattr(obj, part)

    if isinstance(obj, Task):
        if options:
            raise ConfigError(f"{ref} is a Task instance, so it takes no [model.options] "
                              f"(got {', '.join(sorted(options))})", loc="[model.options]",
                              hint="remove [model.options], or point task at the class instead")
        return obj
    if not callable(obj):
        raise ConfigError(f"{ref} is a {type(obj).__name__}, not a Task class or factory", loc=loc,
                          hint="point task at a subclass of progressive.task.Task")
    _check_options(obj, options, ref)
    try:
        task = obj(**options)
    except ProgressiveError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{ref} rejected [model.options]: {exc}", loc="[model.options]",
                          hint=_options_hint(obj)) from None
    if not isinstance(task, Task):
        raise ConfigError(f"{ref}(...) returned a {type(task).__name__}, not a progressive.task.Task", loc=loc,
                          hint="subclass progressive.task.Task and implement build_model, loss and evaluate")
    return task


def _import_module(module_name: str, ref: str, loc: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if missing != module_name and not module_name.startswith(missing + "."):
            # The task's module exists but itself imports something absent: say that, not "no module".
            raise ConfigError(f"importing {module_name} failed: no module named {missing!r}", loc=loc,
                              hint=f"install {missing.split('.')[0]!r} in this environment") from None
        parent, _, leaf = missing.rpartition(".")
        siblings = _submodules(parent)
        close = difflib.get_close_matches(leaf, siblings, n=1)
        if parent and siblings:
            hint = (f"did you mean {parent}.{close[0]}? " if close else "") + f"{parent} contains: {', '.join(siblings)}"
        else:
            hint = "check the spelling, and that the package is installed in this environment (pip install -e .)"
        raise ConfigError(f"no module named {missing!r} (from task {ref!r})", loc=loc, hint=hint) from None
    except ProgressiveError:
        raise
    except Exception as exc:  # the user's module raised at import time: show it, do not hide it
        raise ConfigError(f"importing {module_name} raised {type(exc).__name__}: {exc}", loc=loc,
                          hint="fix the error in that module") from exc


def _submodules(package: str) -> list[str]:
    if not package:
        return []
    try:
        pkg = importlib.import_module(package)
    except Exception:
        return []
    paths = getattr(pkg, "__path__", None)
    return sorted(m.name for m in pkgutil.iter_modules(paths)) if paths else []


def _public_names(obj: Any) -> list[str]:
    names = [n for n in dir(obj) if not n.startswith("_")]
    tasks = [n for n in names if isinstance(getattr(obj, n, None), type) and issubclass(getattr(obj, n), Task)
             and getattr(obj, n) is not Task]
    return tasks or names


def _check_options(factory: Any, options: dict[str, Any], ref: str) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        raise ConfigError(f"{ref} does not accept option(s) {', '.join(map(repr, unknown))}",
                          loc="[model.options]",
                          hint=(f"did you mean {close[0]!r}? " if close else "") + _options_hint(factory))


def _options_hint(factory: Any) -> str:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return "check the options against the task's documentation"
    shown = [f"{p.name}={p.default!r}" if p.default is not p.empty else p.name
             for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return f"accepted options: {', '.join(shown) or '(none)'}"
