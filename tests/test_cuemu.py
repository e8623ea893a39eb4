"""The CUDA emulator itself (tests/cuemu/, tests/cuda_emulator.py): it must catch the errors it
exists to catch. Each test runs a small kernel with a deliberate bug (tests/cuemu/selftest.cu) and
checks that the emulator reports it, and that the fixed kernel passes. The CUDA C++ kernels of
cnnkern run on the emulator in `scripts/dev test-emulated` (CNNKERN_EMULATE_CUDA=1)."""

import cuda_emulator
import pytest
import torch

pytestmark = [
    pytest.mark.skipif(
        cuda_emulator.available() is not None,
        reason=f"cannot build the CUDA emulator here: {cuda_emulator.available()}",
    ),
    # a GPU session runs the kernels for real and has no time to spend building the emulator
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CUDA kernels run on it"),
]

SCHEDULES = ["lockstep", "reverse", "greedy"]


@pytest.fixture(scope="module")
def emu():
    return cuda_emulator.load()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_missing_syncthreads_reads_poison(emu, schedule, monkeypatch):
    monkeypatch.setenv("CUEMU_SCHEDULE", schedule)
    x = torch.randn(64)
    assert torch.equal(emu.selftest_neighbor(x, True), x.roll(-1))
    # every thread runs up to its next barrier before the next thread starts: without the barrier
    # thread t reads slot t+1 before thread t+1 wrote it, and the shared memory is NaN-poisoned
    assert torch.isnan(emu.selftest_neighbor(x, False)).any()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_static_shared_memory_is_poisoned_per_block(emu, schedule, monkeypatch):
    # a static __shared__ array is a function static in the emulator: without the per-block poison,
    # block 0 would read zeros and every later block the previous block's values, never NaN
    monkeypatch.setenv("CUEMU_SCHEDULE", schedule)
    x = torch.randn(3, 32)
    assert torch.equal(emu.selftest_static_neighbor(x, True), x.roll(-1, 1))
    assert torch.isnan(emu.selftest_static_neighbor(x, False)).any(dim=1).all()


@pytest.mark.parametrize("mode", ["eager", "late"])
def test_cp_async_without_wait(emu, mode, monkeypatch):
    monkeypatch.setenv("CUEMU_CP_ASYNC", mode)
    x = torch.randn(128)
    want = x.view(32, 4).roll(-1, 0).reshape(-1)
    assert torch.equal(emu.selftest_cp_async(x, True), want)
    out = emu.selftest_cp_async(x, False)
    if mode == "late":  # the copies land only at a wait (or when their thread exits): none waited,
        # so threads 0-30 read poison; thread 31 reads thread 0's chunk, which landed when thread 0 exited
        assert torch.isnan(out[:124]).all() and torch.equal(out[124:], want[124:])
    else:  # copies at issue: the missing wait goes unnoticed, which is why the tests run both modes
        assert torch.equal(out, want)


def test_warp_collective_with_missing_lanes(emu):
    with pytest.raises(RuntimeError, match="16 of its 32 lanes exited or missing"):
        emu.selftest_divergent_mma(torch.empty(1))


def test_shared_memory_overflow(emu):
    with pytest.raises(RuntimeError, match="wrote past the end of its 256 bytes of dynamic shared memory"):
        emu.selftest_overflow(torch.empty(1))


def test_dynamic_shared_memory_limit(emu):
    x = torch.ones(1)
    assert emu.selftest_big_smem(x, 48 * 1024, 0).item() == 1.0
    with pytest.raises(RuntimeError, match="above 48 KiB needs cudaFuncSetAttribute"):
        emu.selftest_big_smem(x, 64 * 1024, 0)
    assert emu.selftest_big_smem(x, 64 * 1024, 64 * 1024).item() == 1.0
    with pytest.raises(RuntimeError, match="cudaFuncSetAttribute refused"):  # over sm_90's 227 KiB
        emu.selftest_big_smem(x, 64 * 1024, 228 * 1024)


def test_rewrite_rules():
    src = """extern __shared__ __align__(128) unsigned char smem_raw[];
  if (relu) k<T, 4><<<grid, 256, smem, stream>>>(a, f(b, c));
  else other<<<dim3(1, 2), 32>>>();
TORCH_LIBRARY_IMPL(cnnkern, CUDA, m) { if (x.is_cuda()) {} }"""
    out = cuda_emulator.rewrite(src, "t.cu")
    assert "unsigned char* smem_raw = reinterpret_cast<unsigned char*>(::cuemu::dynamic_smem());" in out
    assert "if (relu) ::cuemu::launch(k<T, 4>, grid, 256, smem, stream, a, f(b, c));" in out
    assert "else ::cuemu::launch(other, dim3(1, 2), 32, 0, nullptr);" in out
    assert "TORCH_LIBRARY_IMPL(cnnkern_emu, CPU, m)" in out and "x.is_cpu()" in out
    with pytest.raises(ValueError, match="CUDA syntax the emulator does not rewrite"):
        cuda_emulator.rewrite('asm volatile("bar.sync 0;");', "t.cu")
    out = cuda_emulator.rewrite("  __shared__ __align__(16) A s_x[8][32], s_y[4];", "t.cu")
    assert out == (
        "  static __align__(16) A s_x[8][32], s_y[4]; ::cuemu::static_smem(s_x, sizeof(s_x));"
        " ::cuemu::static_smem(s_y, sizeof(s_y));"
    )
    with pytest.raises(ValueError, match="not an array of fixed size"):
        cuda_emulator.rewrite("__shared__ float v;", "t.cu")


FENCE, ALIGN, WAIT = 1, 2, 4


@pytest.mark.parametrize("mode", ["eager", "late"])
def test_wgmma_reads_swizzled_operands_and_checks_its_rules(emu, mode, monkeypatch):
    """One m64n64k16 wgmma from 128-byte-swizzled shared memory computes A @ B^T (the PTX ISA's
    descriptor, swizzle and accumulator layouts); a missing fence.proxy.async is an error, a tile
    that is not 1024-aligned reads scrambled operands, and (in late mode) accumulators read before
    the wgmma.wait_group are still zero."""
    monkeypatch.setenv("CUEMU_WGMMA", mode)
    a, b = torch.randn(64, 16).half(), torch.randn(64, 16).half()
    want = a.double() @ b.double().T
    torch.testing.assert_close(emu.selftest_wgmma(a, b, FENCE | ALIGN | WAIT).double(), want, rtol=1e-6, atol=1e-5)
    with pytest.raises(RuntimeError, match="written by cp.async without a fence.proxy.async"):
        emu.selftest_wgmma(a, b, ALIGN | WAIT)
    assert not torch.allclose(emu.selftest_wgmma(a, b, FENCE | WAIT).double(), want, rtol=1e-3, atol=1e-3)
    early = emu.selftest_wgmma(a, b, FENCE | ALIGN)
    if mode == "late":
        assert torch.equal(early, torch.zeros_like(early))
    else:  # computed at issue: the early read goes unnoticed, which is why both modes run
        torch.testing.assert_close(early.double(), want, rtol=1e-6, atol=1e-5)


def test_ldmatrix_bank_conflicts_are_counted(emu):
    emu.cuemu_stats()  # reset
    emu.selftest_ldmatrix_conflicts(torch.empty(1), False)
    assert list(emu.cuemu_stats())[:2] == [4, 4 * 7]  # each phase: eight rows in one bank group
    emu.selftest_ldmatrix_conflicts(torch.empty(1), True)
    assert list(emu.cuemu_stats())[:2] == [4, 0]


def test_lds32_bank_conflicts_are_counted(emu):
    """A warp's 32-bit shared loads take one wavefront per distinct word in the busiest bank: lane l
    reading word (l * stride) % 256: stride 2 puts two words in each even bank, stride 32 the eight
    words 0, 32, ..., 224 in bank 0 (each read by four lanes: a broadcast costs nothing more),
    stride 0 one word for all. The launch counts as one block."""
    for stride, extra in ((1, 0), (2, 1), (32, 7), (0, 0), (33, 0)):
        emu.cuemu_stats()
        out = emu.selftest_lds32_conflicts(torch.empty(1), stride)
        assert list(emu.cuemu_stats())[4:] == [1, extra, 1], stride  # (one warp's load, in one block)
        assert torch.equal(out, ((torch.arange(32) * stride) % 256).float()), stride


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_tensor_core_kernels_read_shared_memory_without_bank_conflicts(emu, dtype):
    """The swizzles of the implicit-GEMM forward, grad-input and 16-bit grad-weight kernels: every
    ldmatrix phase of a real layer takes one wavefront; so does every warp's 32-bit load of the
    TF32 grad-weight's fragment words from its padded rows."""
    from helpers import make

    x = make((2, 64, 10, 10), dtype, "cpu", "channels_last")
    w = make((96, 64, 3, 3), dtype, "cpu", "channels_last")
    y = torch.empty(2, 96, 10, 10, dtype=dtype).contiguous(memory_format=torch.channels_last)
    tf32 = dtype == torch.float32
    emu.cuemu_stats()
    emu.conv2d_forward_cuda(x, w, None, y, [1, 1], [1, 1], [1, 1], 1, False, "igemm", False, tf32)
    gx = torch.empty_like(x)
    emu.conv2d_backward_input_cuda(y, w, gx, [1, 1], [1, 1], [1, 1], 1, "igemm", tf32)
    emu.conv2d_backward_weight_cuda(
        y, x, torch.empty_like(w), torch.empty(0, dtype=dtype), [1, 1], [1, 1], [1, 1], 1, "igemm", tf32
    )
    phases, extra, _, _, words, word_extra, _ = emu.cuemu_stats()
    assert phases > 0 and extra == 0, (phases, extra)
    assert word_extra == 0 and (words > 0) == tf32, (words, word_extra)


@pytest.mark.parametrize("cc", ["90", "80"])
def test_auto_takes_wgmma_on_sm90_and_mma_sync_elsewhere(emu, cc, monkeypatch):
    """The CUDA convolution's "auto" choice, seen through the tensor-core instructions that ran:
    fp16/bf16 on wgmma on a compute capability 9.0 device, on mma.sync on an sm_80 one, forward,
    grad-input and grad-weight; TF32 forward and grad-input likewise, its grad-weight on mma.sync
    on both (wgmma has no transposed tf32 operands)."""
    from helpers import make

    monkeypatch.setenv("CUEMU_CC", cc)
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, True)):
        x = make((2, 64, 10, 10), dtype, "cpu", "channels_last")
        w = make((96, 64, 3, 3), dtype, "cpu", "channels_last")
        y = torch.empty(2, 96, 10, 10, dtype=dtype).contiguous(memory_format=torch.channels_last)
        emu.cuemu_stats()
        emu.conv2d_forward_cuda(x, w, None, y, [1, 1], [1, 1], [1, 1], 1, False, "auto", False, tf32)
        gx = torch.empty_like(x)
        emu.conv2d_backward_input_cuda(y, w, gx, [1, 1], [1, 1], [1, 1], 1, "auto", tf32)
        _, _, mma, wgmma, *_ = emu.cuemu_stats()
        on_wgmma = cc == "90"
        assert (wgmma > 0, mma > 0) == (on_wgmma, not on_wgmma), (dtype, mma, wgmma)
        # the grad-weight: 16-bit on wgmma or mma.sync alike; TF32 on mma.sync; fp32 without TF32
        # on the SIMT kernel
        for tf32_wgrad in sorted({tf32, False}):
            emu.conv2d_backward_weight_cuda(
                y, x, torch.empty_like(w), torch.empty(0, dtype=dtype), [1, 1], [1, 1], [1, 1], 1, "auto", tf32_wgrad
            )
            _, _, mma, wgmma, *_ = emu.cuemu_stats()
            sixteen = dtype != torch.float32
            assert (wgmma > 0, mma > 0) == (
                on_wgmma and sixteen,
                not (on_wgmma and sixteen) and (sixteen or tf32_wgrad),
            ), (dtype, tf32_wgrad, mma, wgmma)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_small_channel_layers_run_zero_padded_on_tensor_cores(emu, dtype):
    """A 3-channel first layer (7x7, stride 2) runs on the tensor cores under "auto", forward and
    grad-weight, on zero-padded channels: exactly the tensor-core work of the same layer with 8
    (fp16) or 4 (TF32) real channels, and nothing more. A grouped layer whose channels per group
    would need the padding stays on the SIMT kernels under "auto"."""
    from helpers import make

    tf32 = dtype == torch.float32
    padded = 4 if tf32 else 8

    def tensor_core_ops(c, groups=1, k=16):
        x = make((2, c, 15, 13), dtype, "cpu", "contiguous")
        w = make((k, c // groups, 7, 7), dtype, "cpu")
        y = torch.empty(2, k, 8, 7, dtype=dtype)
        emu.cuemu_stats()
        emu.conv2d_forward_cuda(x, w, None, y, [2, 2], [3, 3], [1, 1], groups, False, "auto", False, tf32)
        _, _, mma, wgmma, *_ = emu.cuemu_stats()
        emu.conv2d_backward_weight_cuda(
            y, x, torch.empty_like(w), torch.empty(0, dtype=dtype), [2, 2], [3, 3], [1, 1], groups, "auto", tf32
        )
        _, _, wmma, wwgmma, *_ = emu.cuemu_stats()
        return mma + wgmma, wmma + wwgmma

    fwd, wgrad = tensor_core_ops(3)
    assert fwd > 0 and wgrad > 0 and (fwd, wgrad) == tensor_core_ops(padded)
    assert tensor_core_ops(6, groups=2) == (0, 0)


@pytest.mark.parametrize("cc", ["90", "80"])
def test_auto_splits_a_gemm_that_leaves_the_sms_idle(emu, cc, monkeypatch):
    """split_k=0 (what the op passes): on a 32-SM device, a TF32 layer of two 64x128 tiles splits
    its 1,152-long reduction (36 steps of 128 bytes) into 9 slices (16 per tile would leave
    slices under four steps); its grad-input, one tile reducing over 2,304 values (72 steps),
    into 18. The results are bitwise those of the explicit splits, not the unsplit ones (fp32
    sums in another order); with the BatchNorm statistics the forward splits alike (its
    statistics come from the reduction kernel)."""
    monkeypatch.setenv("CUEMU_SMS", "32")
    monkeypatch.setenv("CUEMU_CC", cc)
    x = torch.randn(1, 128, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 128, 3, 3) / 34
    g = torch.randn(1, 256, 7, 7).contiguous(memory_format=torch.channels_last)

    def run(split_k, stats=False):
        y = torch.full((1, 256, 7, 7), float("nan")).contiguous(memory_format=torch.channels_last)
        st = emu.conv2d_forward_cuda(
            x, w, None, y, [1, 1], [1, 1], [1, 1], 1, False, "auto", stats, True, None, split_k
        )
        gx = torch.full_like(x, float("nan"))
        emu.conv2d_backward_input_cuda(g, w, gx, [1, 1], [1, 1], [1, 1], 1, "auto", True, split_k)
        return y, gx, st

    auto, one = run(0), run(1)
    assert torch.equal(auto[0], run(9)[0]) and not torch.equal(auto[0], one[0])
    assert torch.equal(auto[1], run(18)[1]) and not torch.equal(auto[1], one[1])
    (y, _, st), (y9, _, st9), (y1, _, st1) = run(0, stats=True), run(9, stats=True), run(1, stats=True)
    assert torch.equal(y, y9) and torch.equal(st, st9) and not torch.equal(y, y1)
    assert st.shape == st1.shape and torch.equal(st[:, 0], st1[:, 0])


@pytest.mark.parametrize("algo", ["igemm", "wgmma"])
def test_strided_grad_input_computes_only_the_taps_that_reach_each_phase(emu, algo):
    """The implicit GEMM's grad-input of a stride-2 convolution runs phase by phase (conv2d.cu:
    dgrad_phases): a 1x1 stride-2 layer's grad-input on a 16x16 image costs the tensor-core
    operations of a stride-1 one on the 8x8 image of the pixels its taps reach (the three other
    phases are zero-filled), where the whole-image GEMM would take four times as many; and it is
    right (into a NaN-filled output)."""
    w = torch.randn(64, 64, 1, 1, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    counts = []
    for size, stride in ((16, 2), (8, 1)):
        gy = torch.randn(2, 64, 8, 8, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        gx = torch.full((2, 64, size, size), float("nan"), dtype=torch.float16).contiguous(
            memory_format=torch.channels_last
        )
        emu.cuemu_stats()
        emu.conv2d_backward_input_cuda(gy, w, gx, [stride] * 2, [0, 0], [1, 1], 1, algo, False)
        _, _, mma, wgmma, *_ = emu.cuemu_stats()
        counts.append(wgmma if algo == "wgmma" else mma)
        ref = torch.nn.grad.conv2d_input((2, 64, size, size), w.double(), gy.double(), stride)
        assert not gx.isnan().any() and torch.allclose(gx.double(), ref, rtol=1e-2, atol=1e-2)
    assert counts[0] == counts[1] > 0, counts
