"""AMP on the bundled tasks, and `progressive doctor --gpu` on a machine without CUDA (issue 19).

CPU autocast shows the defect a GPU would hit first: the reference task's sparse CSR products
have no bf16/fp16 kernels, so under autocast they must leave it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from progressive.selfcheck import PRECOND, SEQLM, amp_check, deterministic_check
from tests.test_trainer_support import one_thread  # noqa: F401  (autouse fixture)

GPU_ONLY = {"fp16 GradScaler", "gpu memory figures", "throughput", "host syncs per step", "nccl 2 ranks"}


def test_a_sparse_csr_product_under_cpu_autocast_fails_without_the_fp32_guard() -> None:
    # The control: what the reference task did before its sparse products left autocast.
    a = torch.eye(4).to_sparse_csr()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="BFloat16"):
        _ = a @ torch.ones(4, 2)  # autocast casts the dense side to bf16; the CSR kernel has none


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_reference_task_trains_under_autocast_with_fp32_sparse_products(tmp_path: Path, dtype: torch.dtype) -> None:
    check = amp_check(PRECOND, dtype, torch.device("cpu"), tmp_path)
    assert check.status == "pass", check.detail
    assert check.figures["sparse_dtype"] == "float32"
    assert check.figures["rel_diff"] <= 0.02


def test_the_sequence_task_trains_under_bf16_autocast(tmp_path: Path) -> None:
    check = amp_check(SEQLM, torch.bfloat16, torch.device("cpu"), tmp_path)
    assert check.status == "pass", check.detail
    assert 0 < check.figures["loss"] and check.figures["rel_diff"] <= 0.02


def test_deterministic_mode_gives_bitwise_equal_gradients_and_is_switched_back(tmp_path: Path) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    check = deterministic_check(torch.device("cpu"), tmp_path)
    assert check.status == "pass", check.detail
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.slow
def test_doctor_gpu_without_cuda_runs_the_cpu_checks_and_skips_the_gpu_ones_with_the_reason(tmp_path: Path) -> None:
    out = tmp_path / "doctor.json"
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "progressive", "doctor", "--gpu", "--out", "doctor.json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("GPU self-check on cpu: CPU (no CUDA device), torch ")
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert len(checks) == 11
    for name in GPU_ONLY:
        assert checks[name]["status"] == "skip"
        assert checks[name]["detail"].startswith("no CUDA device (torch ")
        assert f"skip {name}" in " ".join(res.stdout.split())
    passed = {n for n, c in checks.items() if c["status"] == "pass"}
    assert passed == set(checks) - GPU_ONLY
    assert checks["resume"]["detail"] == "stop, SIGKILL and SIGUSR2 resumes bitwise equal to the uninterrupted run"
    assert "6 passed, 0 failed, 5 skipped; results in doctor.json" in res.stdout


def test_doctor_asks_for_what_to_check() -> None:
    res = subprocess.run([sys.executable, "-m", "progressive", "doctor"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "the following arguments are required: --gpu" in res.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs wherever one is visible)")
def test_every_gpu_check_passes_on_this_gpu() -> None:
    from progressive.selfcheck import run_checks

    results = run_checks("cuda:0")
    assert not [(c.name, c.detail) for c in results if c.status == "fail"]


@pytest.mark.parametrize("device, message", [("gpu", "error: --device: 'gpu' is not a device"),
                                             ("cuda:3", "error: --device: cuda:3 is not visible here (0 CUDA device(s))")])
def test_doctor_refuses_a_device_it_cannot_check(device: str, message: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("the message names what is visible here; this machine has CUDA")
    res = subprocess.run([sys.executable, "-m", "progressive", "doctor", "--gpu", "--device", device],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 2 and res.stderr.startswith(message), res.stderr
