"""`cnnkern inspect`: the Triton kernels compile ahead of time for sm_90 and sm_80 without a GPU,
the main conv kernels use wgmma (sm_90) / mma (sm_80), and no kernel spills."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    # a fresh process without the interpreter: interpreted kernels cannot be compiled
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "cnnkern._inspect", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def test_inspect_passes(report):
    rc, data = report
    bad = [r for r in data["triton"] if not r["ok"]]
    assert rc == 0 and not bad, bad


def test_main_bf16_conv_kernel_uses_wgmma_on_hopper(report):
    _, data = report
    rows = [r for r in data["triton"] if r["label"].startswith("conv2d forward 3x3, bf16") and r["arch"] == 90]
    assert rows, "the main conv kernel was not compiled"
    for r in rows:
        assert r["wgmma"] > 0, r
        assert r["stack"] == 0 and r["local"] == 0, r


def test_every_kernel_and_arch_was_compiled(report):
    _, data = report
    labels = {r["label"] for r in data["triton"]}
    assert {
        "conv2d forward 3x3, bf16 NHWC",
        "conv2d forward 1x1 (GEMM), bf16 NHWC",
        "conv2d dgrad 3x3, bf16 NHWC",
        "conv2d wgrad 3x3, bf16 NHWC",
        "conv2d wgrad split-K sum, bf16 weight",
        "conv2d forward 3x3 split-K partials, bf16 NHWC",
        "conv2d forward split-K sum + residual + ReLU, bf16 NHWC",
        "conv2d forward split-K sum + BatchNorm statistics, bf16 NHWC",
        "conv2d dgrad 3x3 split-K partials, bf16 NHWC",
        "conv_bn_relu finalize, fp32 stats, bf16 params",
        "conv_bn_relu finalize, fp64",
        "conv_bn_relu backward coefficients, bf16 params",
        "conv_bn_relu apply + ReLU, bf16 NHWC",
        "conv_bn_relu backward reductions, bf16 NHWC",
        "conv_bn_relu backward dy, bf16 NHWC",
    } <= labels
    assert {r["arch"] for r in data["triton"]} == {80, 90}
    sm80_main = [r for r in data["triton"] if r["arch"] == 80 and r["label"].startswith("conv2d forward 3x3")]
    assert all(r["mma"] > 0 for r in sm80_main)


def _small_c_configs():
    import triton

    tiles = [(64, 64, 64, 4, 4), (64, 64, 32, 4, 4), (128, 64, 32, 8, 3)]
    return tiles, [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for (m, n, k, w, s) in tiles
    ]


def test_tiles_a_triton_release_spills_in_are_left_out_for_that_kernel_and_arch_only(monkeypatch):
    """kernels/conv2d.py's _SPILLS: Triton 3.6 (the GPU machine's) spills in the 64x64x64 small-channel
    tile on sm_90, which Triton 3.8 compiles cleanly; the autotuner does not time it there."""
    from cnnkern.kernels import conv2d

    tiles, configs = _small_c_configs()

    def kept(**kw):
        return [conv2d._tile(c) for c in conv2d.gpu_configs(configs, **kw)]

    monkeypatch.setattr(conv2d, "_TRITON_VERSION", (3, 6))
    assert kept(kernel="_fwd_small_c_kernel", arch=90) == tiles[1:]
    assert kept(kernel="_fwd_small_c_kernel", arch=80) == tiles
    assert kept(kernel="_dgrad_kernel", arch=90) == tiles
    monkeypatch.setattr(conv2d, "_TRITON_VERSION", (3, 8))
    assert kept(kernel="_fwd_small_c_kernel", arch=90) == tiles


@pytest.mark.gpu
def test_prune_leaves_out_the_spilling_tiles_of_this_gpu(monkeypatch):
    import torch

    from cnnkern.kernels import conv2d

    _, configs = _small_c_configs()
    monkeypatch.setattr(conv2d, "_TRITON_VERSION", (3, 6))
    major, minor = torch.cuda.get_device_capability()
    named = {"x_ptr": torch.empty(1, device="cuda"), "Cg": 3, "Kg": 64}
    pruned = conv2d._prune(configs, named, kernel="_fwd_small_c_kernel", HAS_RES=False, SPLIT=False)
    smem = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    assert pruned == conv2d.gpu_configs(
        configs, kernel="_fwd_small_c_kernel", arch=major * 10 + minor, elem_bytes=4, smem_limit=smem
    )
    assert len(pruned) == (2 if (major, minor) == (9, 0) else 3)


def test_tiles_whose_pipeline_cannot_fit_in_shared_memory_are_left_out():
    """An H100 gives a block 227 KiB: fp32's 128x256x64 tile of 3 stages needs 288 KiB (what Triton
    allocates for it on sm_90), so neither the autotuner nor the deterministic mode's shape-based
    choice gets it; where nothing fits (fp64), the smallest tile runs with fewer stages."""
    import triton

    from cnnkern.kernels import conv2d

    tiles = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4)]
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_C": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for (m, n, k, w, s) in tiles
    ]

    def kept(**kw):
        return [conv2d._tile(c) for c in conv2d.gpu_configs(configs, **kw)]

    assert conv2d.smem_bound(configs[0], 4) == 294912
    assert kept(elem_bytes=2, smem_limit=232448) == tiles
    assert kept(elem_bytes=4, smem_limit=232448) == tiles[1:]
    # fp64: no tile fits with its stages (64x64x64 x 4 stages: 256 KiB); the smallest runs with 3
    assert kept(elem_bytes=8, smem_limit=232448) == [(64, 64, 64, 4, 3)]
    assert kept(elem_bytes=8, smem_limit=166912) == [(64, 64, 64, 4, 2)]  # an A100's 163 KiB
    assert kept() == tiles  # no device limits given: nothing to check against
    # the statistics epilogue, like a residual, holds a second tile: no 128x256
    assert kept(STATS=True) == tiles[1:] and kept(HAS_RES=True) == tiles[1:]


def test_variant_configurations_fit_in_shared_memory():
    """`cnnkern inspect --variants`: the autotuned conv kernels in the other dtypes and layouts; here
    the fp64 and TF32 forwards on sm_90, whose pipelines are the largest: every configuration the
    pruning keeps is within the H100's 227 KiB per block as compiled (fp64 keeps one tile at
    fewer stages)."""
    code = textwrap.dedent("""
        import json
        from cnnkern import _inspect
        specs = {s.label: s for s in _inspect.variant_specs()}
        picked = ["conv2d forward 3x3, fp64 NHWC", "conv2d forward 3x3, fp32 TF32 NHWC"]
        rows = [r.__dict__ for label in picked for r in _inspect.compile_triton(specs[label], 90)]
        print(json.dumps({"n": len(specs), "labels": sorted(specs), "rows": rows}))
        """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["n"] == len(set(data["labels"])) and data["n"] >= 6 * 6, data["labels"]
    assert all("bf16 NHWC" not in label for label in data["labels"])
    fp64 = [r for r in data["rows"] if "fp64" in r["label"]]
    assert len(fp64) == 1 and fp64[0]["config"].endswith("stages=3"), fp64
    assert data["rows"] and all(r["shared"] <= 232448 for r in data["rows"]), data["rows"]


@pytest.mark.parametrize("dtype_bytes, smem", [(2, 232448), (4, 232448), (8, 232448), (4, 166912)])
def test_the_deterministic_tile_fits_in_shared_memory(dtype_bytes, smem):
    """Under torch.use_deterministic_algorithms(True) the forward's tile comes from the shape: the
    largest that still fills the SMs. For ResNet-50's first 3x3 layer at batch 32 (M = 100,352
    output pixels, 64 channels) in fp32 that was the 128x256 tile, whose 288 KiB pipeline no GPU
    can give a block; from the pruned GPU space it is a tile that fits (H100: 227 KiB, A100: 163)."""
    from cnnkern.kernels import conv2d

    configs = conv2d.gpu_configs(
        conv2d._configs(conv2d._FWD_SPACE, interpret=False),
        kernel="_fwd_kernel",
        arch=90,
        elem_bytes=dtype_bytes,
        smem_limit=smem,
        HAS_RES=False,
        SPLIT=False,
        STATS=False,
    )
    cfg = conv2d.deterministic_config(configs, 32 * 56 * 56, 64, 132)
    assert conv2d.smem_bound(cfg, dtype_bytes) <= smem, cfg
    unpruned = conv2d.deterministic_config(conv2d._configs(conv2d._FWD_SPACE, interpret=False), 32 * 56 * 56, 64, 132)
    assert conv2d._tile(unpruned)[:2] == (128, 256)  # what it chose before the pruning knew the limit
    if dtype_bytes == 2:
        assert conv2d._tile(cfg) == conv2d._tile(unpruned)  # bf16/fp16: 144 KiB, unchanged
