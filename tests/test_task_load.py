"""load_task: "module:object" refs, options, and the messages when they are wrong."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from progressive.errors import ConfigError
from progressive.task import Task, load_task
from progressive.tasks.precond import PreconditionerTask


class ConstantTask(Task):
    """A minimal user task: proves the interface needs only three methods."""

    def __init__(self, width: int = 2) -> None:
        self.width = width

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(self.width, 1)

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        return model(torch.randn(1, self.width, generator=generator)).square().mean()

    def evaluate(self, model: torch.nn.Module, dataset: Any, *, device: torch.device, max_samples: int) -> dict[str, float]:
        return {"n": float(min(len(dataset), max_samples))}


INSTANCE = ConstantTask(width=3)
NOT_A_TASK = 42


def make_dict(**options: Any) -> dict[str, Any]:
    return options


def test_reference_task_loads_with_options() -> None:
    task = load_task("progressive.tasks.precond:PreconditionerTask", {"hidden": 12, "layers": 1})
    assert isinstance(task, PreconditionerTask) and task.hidden == 12 and task.layers == 1


def test_user_task_class_and_instance() -> None:
    task = load_task("tests.test_task_load:ConstantTask", {"width": 5})
    assert isinstance(task, ConstantTask) and task.width == 5
    assert load_task("tests.test_task_load:INSTANCE", {}) is INSTANCE
    with pytest.raises(ConfigError, match="is a Task instance, so it takes no"):
        load_task("tests.test_task_load:INSTANCE", {"width": 1})


def test_unknown_module_lists_siblings() -> None:
    with pytest.raises(ConfigError) as err:
        load_task("progressive.tasks.precnd:PreconditionerTask", {})
    text = str(err.value)
    assert "no module named 'progressive.tasks.precnd'" in text and "[model].task" in text
    assert "did you mean progressive.tasks.precond?" in text and "pcg, precond" in text
    with pytest.raises(ConfigError, match="pip install -e"):
        load_task("nosuchpackage_xyz.mod:Task", {})


def test_missing_attribute_lists_tasks_in_the_module() -> None:
    with pytest.raises(ConfigError) as err:
        load_task("progressive.tasks.precond:PreconditionTask", {})
    text = str(err.value)
    assert "progressive.tasks.precond has no attribute 'PreconditionTask'" in text
    assert "did you mean 'PreconditionerTask'?" in text


def test_unknown_option_lists_accepted_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_task("progressive.tasks.precond:PreconditionerTask", {"hiden": 8})
    text = str(err.value)
    assert "does not accept option(s) 'hiden'" in text and "did you mean 'hidden'?" in text
    assert "hidden=32" in text and "[model.options]" in text
    with pytest.raises(ConfigError, match="rejected \\[model.options\\]"):
        load_task("progressive.tasks.precond:PreconditionerTask", {"hidden": 0})


def test_not_a_task() -> None:
    with pytest.raises(ConfigError, match="is a int, not a Task class"):
        load_task("tests.test_task_load:NOT_A_TASK", {})
    with pytest.raises(ConfigError, match="returned a dict, not a progressive.task.Task"):
        load_task("tests.test_task_load:make_dict", {})
    with pytest.raises(ConfigError, match="must look like"):
        load_task("progressive.tasks.precond", {})


def test_module_that_fails_to_import_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_task_mod.py").write_text("import numpy\nraise RuntimeError('boom at import')\n")
    (tmp_path / "needs_dep_mod.py").write_text("import missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing broken_task_mod raised RuntimeError: boom at import"):
        load_task("broken_task_mod:T", {})
    with pytest.raises(ConfigError, match="no module named 'missing_dependency_xyz'") as err:
        load_task("needs_dep_mod:T", {})
    assert "install 'missing_dependency_xyz'" in str(err.value)
    sys.modules.pop("broken_task_mod", None)
