"""The docs site: the generated reference matches the code, and `mkdocs build --strict` passes.

Not marked slurm: these run everywhere, CI included (the test extra installs mkdocs-material).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "scripts" / "gen_docs.py"


def test_generated_reference_is_not_stale() -> None:
    res = subprocess.run([sys.executable, str(GEN), "--check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, ("docs/reference/ differs from what the code generates; "
                                 f"run `python scripts/gen_docs.py`\n{res.stdout}{res.stderr}")


def test_check_fails_on_a_stale_page(tmp_path: Path) -> None:
    out = tmp_path / "reference"
    assert subprocess.run([sys.executable, str(GEN), "--out", str(out)], cwd=ROOT, capture_output=True,
                          timeout=120).returncode == 0
    page = out / "cli.md"
    page.write_text(page.read_text(encoding="utf-8") + "hand edit\n", encoding="utf-8")
    res = subprocess.run([sys.executable, str(GEN), "--check", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1
    assert "cli.md" in res.stderr


def test_reference_names_every_command_and_key() -> None:
    from progressive import config
    from progressive.cli import build_parser
    from progressive.sweep import config as sweep_config

    cli = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert f"## `progressive {name}`" in cli, name
    stages = (ROOT / "docs" / "reference" / "stages-toml.md").read_text(encoding="utf-8")
    for model in (config.RunConfig, config.SlurmConfig, config.TrainConfig, config.ModelConfig,
                  config.WandbConfig, config.MlflowConfig, config.TensorboardConfig):
        for key in model.model_fields:
            assert f"| `{key}` |" in stages, (model.__name__, key)
    sweep = (ROOT / "docs" / "reference" / "sweep-toml.md").read_text(encoding="utf-8")
    for model in (sweep_config.SweepTable, sweep_config.Subset, sweep_config.Prune, sweep_config.Range):
        for key in model.model_fields:
            assert f"`{key}`" in sweep or f"`[sweep.{key}]`" in sweep, (model.__name__, key)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs-material is not installed: pip install -e '.[docs]' (the test extra has it)")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    for page in ("index.html", "reference/stages-toml/index.html", "reference/cli/index.html",
                 "troubleshooting/index.html", "benchmarks/index.html"):
        assert (site / page).is_file(), page
    # benchmarks/RESULTS.md is included, not copied: its first heading reaches the site.
    assert "Benchmark results" in (site / "benchmarks" / "index.html").read_text(encoding="utf-8")


def test_the_readmes_curriculum_is_a_valid_stages_toml_and_its_links_exist() -> None:
    import re

    from progressive.config import parse_config

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    cfg = parse_config(example, source="README.md")
    assert [st.name for st in cfg.stage] == ["small_512", "large_4096"] and cfg.tracking.wandb is not None
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", readme)
    assert links and all((ROOT / link).is_file() for link in links), [x for x in links if not (ROOT / x).is_file()]
    assert len(readme.splitlines()) <= 130  # the manual lives in docs/
