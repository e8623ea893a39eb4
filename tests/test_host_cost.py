"""Host work per warm call, gated (benchmarks/bench_host.py, under a stand-in CUDA driver).

* The direct launches of a warm call pass Triton's C launcher exactly what Triton's own path
  passes (benchmarks/host/check_launches.py): the fast path launches the same kernels with the
  same arguments, so what the GPU computes is what Triton's path would have it compute.
* Instructions per warm call, counted by callgrind, stay within the budgets of
  benchmarks/bench_host.py (BUDGETS) plus 10%.
* Warm network forwards and training steps do nothing a CUDA graph capture forbids, as far as
  the CPU can tell (benchmarks/host/check_capture.py).

Both need gcc and Triton's real (non-interpreter) compiler; the budgets also need valgrind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from benchmarks import bench_host

pytestmark = pytest.mark.skipif(
    os.path.exists("/proc/driver/nvidia"),
    reason="a real NVIDIA driver is present: the stand-in driver never loads there",
)


def _run_check(module: str) -> list[str]:
    """Run ``module`` in a child process under the stand-in driver; its lines of findings."""
    work = tempfile.mkdtemp(prefix="cnnkern-host-test-")
    try:
        stub = os.path.join(work, "stub")
        bench_host.build_stub(stub)
        proc = subprocess.run(
            [sys.executable, "-m", module],
            env=bench_host._child_env(stub),
            cwd=bench_host.ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith(("ok:", "MISMATCH:", "FOUND:"))]


def test_direct_launches_match_triton():
    lines = _run_check("benchmarks.host.check_launches")
    assert len(lines) >= 10 and all(line.startswith("ok:") for line in lines), lines


def test_networks_do_nothing_a_cuda_graph_capture_forbids():
    """benchmarks/host/check_capture.py: warm eval forwards of the networks and warm training steps
    read no tensor on the host, synchronise nothing and load no kernel (both GPU backends)."""
    lines = _run_check("benchmarks.host.check_capture")
    assert len(lines) >= 8 and all(line.startswith("ok:") for line in lines), lines


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instruction_budgets():
    cases = sorted(bench_host.BUDGETS)
    result = bench_host.run(cases, callgrind=True, repeats=1)
    over = []
    for name, budget in bench_host.BUDGETS.items():
        ins = result["cases"][name].get("instructions")
        assert ins is not None, f"{name}: no instruction count"
        if ins > 1.1 * budget:
            over.append(f"{name}: {ins} instructions per call, budget {budget} (+10%)")
    assert not over, "\n".join(over) + "\n" + bench_host.format_table(result)


def test_forward_autotune_key_separates_the_statistics_forward():
    """The statistics forward prunes its own configurations (kernels/conv2d.py gpu_configs), so
    the forward kernels' autotune key holds STATS: every key name is a parameter of each forward
    kernel (Triton ignores a name that is not), and STATS is one."""
    from cnnkern.kernels import conv2d as K

    assert "STATS" in K._FWD_KEY
    for kernel in (K._fwd_kernel, K._fwd_1x1_kernel, K._fwd_small_c_kernel):
        assert set(K._FWD_KEY) <= set(kernel.fn.arg_names), kernel.fn.arg_names
        assert kernel.keys == K._FWD_KEY
