"""The build: the CUDA extension is compiled for sm_80 and sm_90a (+ sm_90 PTX) without a GPU, its kernels
do not spill, its ops are registered for the CUDA dispatch key, and cnnkern imports without it."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import cnnkern
from cnnkern import _backend, _inspect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLKIT = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
needs_ext = pytest.mark.skipif(not _backend.has_extension(), reason="cnnkern._C not built")

CUDA_OPS = ["residual_add_cuda", "residual_add_backward_cuda", "residual_add_shortcut_backward_cuda"]
# ops that write into outputs the Python side allocates (no fake implementation needed: they are
# only called inside the cnnkern::conv2d* custom ops, whose fakes allocate the outputs)
CUDA_OUT_OPS = ["conv2d_forward_cuda", "conv2d_backward_input_cuda", "conv2d_backward_weight_cuda"]


@pytest.mark.skipif(not (os.environ.get("CI") and TOOLKIT), reason="enforced in CI, where a toolkit is present")
def test_ci_builds_the_extension():
    assert _backend.has_extension(), _backend._C_ERROR


@needs_ext
def test_extension_holds_sm80_sm90_and_ptx():
    code = _inspect.embedded_code(_inspect.extension_path())
    assert {"sm_80", "sm_90a"} <= set(code["elf"]), code
    assert "sm_90" in code["ptx"], code
    assert _backend._C.cuda_archs == "sm_80,sm_90a,compute_90"


@needs_ext
def test_no_kernel_spills_or_uses_a_stack():
    rows = _inspect.resource_usage(_inspect.extension_path())
    kernels = [r for r in rows if "residual_add" in r.name or "kernel" in r.name]
    assert len(kernels) >= 8, f"expected the residual-add kernels in the dump, got {len(kernels)}"
    bad = [r for r in rows if r.local or r.stack]
    assert not bad, f"kernels with spills / stack frames: {bad}"
    # memory-bound kernels (everything but the convolution's): keep occupancy high
    elementwise = [r for r in rows if "conv" not in r.name]
    assert max(r.registers for r in elementwise) <= 64
    # the convolution kernels: 2 blocks of 256 threads per SM at least (<= 128 registers), with
    # two known exceptions that hold one block per SM:
    #  - the wgmma implicit GEMM (<= 168 registers: the TF32 tiles and the one-warpgroup 64 x 128
    #    tile take more than 128; every wgmma tile runs one block per SM anyway, its 5 stages take
    #    121-161 KiB of shared memory);
    #  - the TF32 128 x 128 tiles of the mma.sync implicit GEMM (forward and grad-input, <= 144;
    #    the shared epilogue, with its staged path for 16-byte stores and its split-K partial
    #    stores, puts the sm_80 grad-input one at 141; forcing 128 with __launch_bounds__(256, 2)
    #    spills; anything from 129 to 255 registers holds the same one block of 256 threads).
    conv = [r for r in rows if "conv" in r.name]
    kinds = ("direct_kernel", "igemm_kernel", "wgmma_kernel", "wgrad_kernel", "bias_grad_kernel")
    names = {k for r in conv for k in kinds if k in r.name}
    assert names == set(kinds), names
    wgmma_fwd = [r for r in conv if re.search(r"\dwgmma_kernelI(?:\w+E|f)Li\dELi\d+E", r.name) and r.arch == "sm_90a"]
    assert len(wgmma_fwd) == 18 and max(r.registers for r in wgmma_fwd) <= 168, [
        (r.name, r.registers) for r in wgmma_fwd
    ]
    tf32 = [r for r in conv if re.search(r"\digemm_kernelIfLi128ELi128ELi2ELb[01]E", r.name)]
    assert len(tf32) == 4 and max(r.registers for r in tf32) <= 144, tf32
    rest = [r for r in conv if r not in wgmma_fwd + tf32]
    assert max(r.registers for r in rest) <= 128, [(r.name, r.registers) for r in rest if r.registers > 128]


@needs_ext
@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_ops_are_registered_for_the_cuda_key(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnkern::{op}", "CUDA")
    assert hasattr(torch.ops.cnnkern, op)
    # and they have fake implementations (for torch.compile / opcheck)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(2, 8, 4, 4, device="cuda" if torch.cuda.is_available() else "meta")
        s = torch.empty(2, 4, 8, 8, device=x.device)
        if op == "residual_add_cuda":
            out = torch.ops.cnnkern.residual_add_cuda(x, s, 2, True)
            assert out.shape == x.shape
        elif op == "residual_add_backward_cuda":
            assert torch.ops.cnnkern.residual_add_backward_cuda(x, x).shape == x.shape
        else:
            gs = torch.ops.cnnkern.residual_add_shortcut_backward_cuda(x, [2, 4, 8, 8], 2, True)
            assert gs.shape == (2, 4, 8, 8) and gs.is_contiguous(memory_format=torch.channels_last)


@needs_ext
@pytest.mark.parametrize("op", CUDA_OUT_OPS)
def test_conv_cuda_ops_are_registered_with_their_schemas(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnkern::{op}", "CUDA")
    schema = str(getattr(torch.ops.cnnkern, op).default._schema)
    assert "Tensor(a!)" in schema, schema


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-tensor error")
@pytest.mark.parametrize(
    "op,args",
    [
        (
            "conv2d_forward_cuda",
            lambda x, w: (x, w, None, torch.empty(1, 4, 3, 3), [1, 1], [0, 0], [1, 1], 1, False, "auto"),
        ),
        ("conv2d_backward_input_cuda", lambda x, w: (torch.randn(1, 4, 3, 3), w, x, [1, 1], [0, 0], [1, 1], 1, "auto")),
        (
            "conv2d_backward_weight_cuda",
            lambda x, w: (torch.randn(1, 4, 3, 3), x, w, torch.empty(0), [1, 1], [0, 0], [1, 1], 1),
        ),
        ("bn_apply_cuda", lambda x, w: (x, x, torch.ones(2), torch.zeros(2), True)),
    ],
)
def test_conv_cuda_ops_with_cpu_tensors_are_a_clear_error(op, args):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3)
    with pytest.raises(NotImplementedError, match=op):
        getattr(torch.ops.cnnkern, op)(*args(x, w))


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-tensor error")
def test_cuda_op_with_cpu_tensors_is_a_clear_error():
    x = torch.randn(1, 2, 2, 2)
    with pytest.raises(NotImplementedError, match="residual_add_cuda"):
        torch.ops.cnnkern.residual_add_cuda(x, x, 1, True)


def test_import_without_the_extension():
    """A tree without cnnkern._C (no toolkit at build time) still imports; "cuda" is then absent
    and explicitly asking for it says how to build it."""
    code = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'cnnkern._C':\n"
        "            raise ImportError('hidden for the test')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import torch, cnnkern\n"
        "assert 'cuda' not in cnnkern.available_backends()\n"
        "x = torch.ones(1, 2, 2, 2)\n"
        "assert torch.equal(cnnkern.functional.residual_add(x, x), 2 * x)\n"
        "try:\n"
        "    cnnkern.functional.residual_add(x, x, backend='cuda')\n"
        "except cnnkern.BackendUnavailableError as e:\n"
        "    print(e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "backend 'cuda' is unavailable" in res.stdout
    assert "pip install --no-build-isolation" in res.stdout


def test_setup_without_toolkit_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    env["CUDA_HOME"] = str(tmp_path / "no-cuda")  # a toolkit location with no nvcc
    env["PATH"] = "/usr/bin:/bin"
    res = subprocess.run(
        [sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("cnnkern setup:")]
    assert len(lines) == 1 and "no CUDA toolkit found" in lines[0], res.stderr
    assert res.stdout.strip() == "cnnkern"


def test_version():
    assert cnnkern.__version__ == "0.1.0"


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_implicit_gemm_kernels_use_tensor_cores_ldmatrix_and_cp_async(arch):
    """Static proof (no GPU needed) that every implicit-GEMM instantiation compiled to what its
    design says: per 64-byte step of kk, 2 x MT x NT warp MMAs of the dtype's kind, fed by
    ldmatrix (LDSM) from a cp.async (LDGSTS) pipeline."""
    import re

    kinds = {"Half": "HMMA.16816.F32", "BFloat16": "HMMA.16816.F32.BF16", "f": "HMMA.1688.F32.TF32"}
    found = 0
    for name, ops in _inspect.sass_opcodes(_inspect.extension_path(), arch).items():
        m = re.search(r"igemm_kernelI(?:N3c10\d+(Half|BFloat16)E|(f))Li(\d+)ELi(\d+)ELi(\d+)E", name)
        if not m:
            continue
        found += 1
        dtype = m.group(1) or m.group(2)
        bm, bn, warps_m = int(m.group(3)), int(m.group(4)), int(m.group(5))
        mt, nt = bm // warps_m // 16, bn // (8 // warps_m) // 8
        mma = {k: v for k, v in ops.items() if k.startswith("HMMA")}
        assert mma == {kinds[dtype]: 2 * mt * nt}, (name, ops)
        assert any(k.startswith("LDSM") for k in ops) and any(k.startswith("LDGSTS") for k in ops), (name, ops)
    assert found == 18, found  # 3 dtypes x 3 tiles x (forward, grad-input)


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_wgmma_kernels_are_warpgroup_mma_only_on_sm90a(arch):
    """The wgmma implicit GEMM (conv2d_wgmma.cu) per 128-byte step of kk: four wgmma (HGMMA) of the
    dtype's kind and tile width (m64nNk16 for fp16/bf16, m64nNk8 TF32 for fp32), issued after a
    warpgroup arrive and waited for with a warpgroup dependency barrier, from a cp.async pipeline
    whose copies are fenced into the async proxy; no mma.sync. On sm_80 the kernels are empty
    (the host never launches them)."""
    import re

    kinds = {"Half": "16.F32", "BFloat16": "16.F32.BF16", "f": "8.F32.TF32"}
    found = 0
    for name, ops in _inspect.sass_opcodes(_inspect.extension_path(), arch).items():
        m = re.search(r"wgmma_kernelI(?:N3c10\d+(Half|BFloat16)E|(f))Li(\d)ELi(\d+)ELb([01])E", name)
        if not m:
            continue
        found += 1
        if arch == "sm_80":
            assert not any(k.startswith(("HGMMA", "HMMA", "LDGSTS")) for k in ops), (name, ops)
            continue
        kind = kinds[m.group(1) or m.group(2)]
        assert {k: v for k, v in ops.items() if k.startswith(("HGMMA", "HMMA"))} == {
            f"HGMMA.64x{m.group(4)}x{kind}": 4
        }, (name, ops)
        assert ops.get("WARPGROUP.ARRIVE", 0) >= 1 and ops.get("WARPGROUP.DEPBAR.LE", 0) >= 2, (name, ops)
        assert ops.get("FENCE.VIEW.ASYNC.S", 0) >= 1 and any(k.startswith("LDGSTS") for k in ops), (name, ops)
    assert found == 18, found  # 3 dtypes x 3 tiles x (forward, grad-input)


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_tensor_core_weight_gradient_kernels(arch):
    """The tensor-core grad-weight (conv2d_wgrad_igemm.cu): fp16/bf16 per 32-pixel step, 2 k-steps
    x 2 x 4 warp MMAs of the dtype's kind, operands through transposing ldmatrix (LDSM .MT88);
    fp32 as TF32 per 16-pixel step, 2 k-steps x 2 x 4 m16n8k8 TF32 MMAs, operands read word by
    word (ldmatrix cannot transpose 32-bit elements); both from a cp.async pipeline."""
    kinds = {"Half": "HMMA.16816.F32", "BFloat16": "HMMA.16816.F32.BF16", "float": "HMMA.1688.F32.TF32"}
    found = set()
    for name, ops in _inspect.sass_opcodes(_inspect.extension_path(), arch).items():
        if "wgrad_igemm_kernel" not in name:
            continue
        dtype = "BFloat16" if "BFloat16" in name else "Half" if "Half" in name else "float"
        found.add(dtype)
        assert {k: v for k, v in ops.items() if k.startswith("HMMA")} == {kinds[dtype]: 16}, (name, ops)
        assert ops.get("LDSM.16.MT88.4", 0) == (0 if dtype == "float" else 8), (name, ops)
        assert any(k.startswith("LDGSTS") for k in ops), (name, ops)
    assert found == set(kinds), found


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_wgmma_weight_gradient_kernels(arch):
    """The wgmma grad-weight (conv2d_wgrad_wgmma.cu) per 64-pixel step: four m64n64k16 wgmma of the
    dtype's kind per warpgroup, both operands transposed (M-major A, N-major B), after a
    warpgroup arrive, waited for with a dependency barrier, from a cp.async pipeline fenced into
    the async proxy; no mma.sync, no ldmatrix. Empty on sm_80."""
    found = 0
    for name, ops in _inspect.sass_opcodes(_inspect.extension_path(), arch).items():
        if "wgrad_wgmma_kernel" not in name:
            continue
        found += 1
        if arch == "sm_80":
            assert not any(k.startswith(("HGMMA", "HMMA", "LDGSTS")) for k in ops), (name, ops)
            continue
        kind = "F32.BF16" if "BFloat16" in name else "F32"
        assert {k: v for k, v in ops.items() if k.startswith(("HGMMA", "HMMA"))} == {f"HGMMA.64x64x16.{kind}": 4}, (
            name,
            ops,
        )
        assert not any(k.startswith("LDSM") for k in ops), (name, ops)
        assert ops.get("WARPGROUP.ARRIVE", 0) >= 1 and ops.get("WARPGROUP.DEPBAR.LE", 0) >= 2, (name, ops)
        assert ops.get("FENCE.VIEW.ASYNC.S", 0) >= 1 and any(k.startswith("LDGSTS") for k in ops), (name, ops)
    assert found == 2, found  # fp16, bf16
