"""A small run of every cnnkern kernel, for compute-sanitizer (scripts/gpu_validate.sh, step
"sanitize"): each op forward and backward once on small CUDA tensors, for each GPU backend that has
a kernel for it (Triton, CUDA C++), in the layouts and dtypes that select different kernels
(NCHW, channels_last, a strided view; fp16 and fp32; identity and option-A shortcuts; the conv's
main, small-channel and 1x1 kernels and split-K; training and eval conv-BN-ReLU).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitize_run.py

Without the caching allocator every tensor is its own cudaMalloc, so an out-of-bounds access is
caught at the tensor's edge rather than inside a larger cached block. The script checks results
loosely against PyTorch (to catch a kernel that silently did nothing) and exits non-zero on any
failure; it prints one line per case.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _make(shape, dtype, layout):
    t = torch.randn(shape, device="cuda", dtype=torch.float32)
    if layout == "channels_last":
        t = t.to(memory_format=torch.channels_last)
    elif layout == "strided":
        n, c, h, w = shape
        t = torch.randn(n, c, w, 2 * h, device="cuda")[..., ::2].transpose(2, 3)
    return t.to(dtype).requires_grad_()


def _check(name, got, want, tol):
    got, want = got.detach().double(), want.detach().double()
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.2e} > {tol:.0e}")


def cases(backend, dtype, layout):
    """(name, function) pairs: each runs one op forward and backward and checks it."""
    import torch.nn.functional as TF

    from cnnkern import functional as F

    # loose: the sanitizer judges memory accesses; these only catch a kernel that did nothing
    # (fp16 rounding and TF32 in the outputs; ReLU-mask flips near zero in the gradients)
    tol, gtol = 2e-2, 1e-1

    def conv(kernel_shape, c, padding, stride=1, groups=1, residual=False):
        def run():
            x = _make((2, c, 9, 9), dtype, layout)
            w = (torch.randn(8, c // groups, *kernel_shape, device="cuda") * 0.2).to(dtype).requires_grad_()
            b = torch.randn(8, device="cuda").to(dtype).requires_grad_()
            pre = TF.conv2d(x.float(), w.float(), b.float(), stride, padding, 1, groups)
            r = _make(tuple(pre.shape), dtype, layout) if residual else None
            y = F.conv2d(
                x, w, b, stride=stride, padding=padding, groups=groups, activation="relu", residual=r, backend=backend
            )
            ref = torch.relu(pre + r.float() if residual else pre)
            _check("out", y, ref, tol)
            gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
            rx, rw, rb = torch.autograd.grad(ref, (x, w, b), torch.ones_like(ref))
            for n_, a, r in (("grad x", gx, rx), ("grad w", gw, rw), ("grad b", gb, rb)):
                _check(n_, a, r, gtol)

        return run

    def cbr(training, residual=False, c=16):
        def run():
            x = _make((2, c, 9, 9), dtype, layout)
            w = (torch.randn(8, c, 3, 3, device="cuda") * 0.4 / c**0.5).to(dtype).requires_grad_()
            gamma = torch.rand(8, device="cuda").add(0.5).requires_grad_()
            beta = torch.randn(8, device="cuda", requires_grad=True)
            rm, rv = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")
            rm2, rv2 = rm.clone(), rv.clone()
            r = _make((2, 8, 9, 9), dtype, layout) if residual else None
            y = F.conv_bn_relu(
                x, w, None, rm, rv, gamma, beta, training=training, padding=1, residual=r, backend=backend
            )
            ref = TF.batch_norm(TF.conv2d(x.float(), w.float(), None, 1, 1), rm2, rv2, gamma, beta, training)
            ref = torch.relu(ref + r.float() if residual else ref)
            _check("out", y, ref, 3 * tol)
            got = torch.autograd.grad(y, (x, w, gamma, beta), torch.ones_like(y))
            assert all(torch.isfinite(g).all() for g in got)

        return run

    def lrn(size):
        def run():
            x = _make((2, 16, 7, 7), dtype, layout)
            y = F.local_response_norm(x, size, alpha=1e-2, k=2.0, backend=backend)
            ref = TF.local_response_norm(x.float(), size, alpha=1e-2, k=2.0)
            _check("out", y, ref, 1e-2 if dtype == torch.float16 else 1e-5)
            (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
            (r,) = torch.autograd.grad(ref, x, torch.ones_like(ref))
            _check("grad", g, r, 1e-2 if dtype == torch.float16 else 1e-4)

        return run

    def residual(option_a):
        def run():
            x = _make((2, 16, 8, 8), dtype, layout)
            s = _make((2, 8, 16, 16) if option_a else (2, 16, 8, 8), dtype, layout)
            y = F.residual_add(x, s, backend=backend)
            sc = TF.pad(s.float()[:, :, ::2, ::2], (0, 0, 0, 0, 0, 8)) if option_a else s.float()
            ref = torch.relu(x.float() + sc)
            _check("out", y, ref, 1e-3)
            gx, gs = torch.autograd.grad(y, (x, s), torch.ones_like(y))
            rx, rs = torch.autograd.grad(ref, (x, s), torch.ones_like(ref))
            _check("grad x", gx, rx, 1e-3)
            _check("grad s", gs, rs, 1e-3)

        return run

    return [
        ("conv2d", "3x3 main", conv((3, 3), 16, 1)),
        ("conv2d", "3x3/2 small-channel", conv((3, 3), 3, 1, stride=2)),
        ("conv2d", "1x1", conv((1, 1), 16, 0)),
        ("conv2d", "3x3 groups=2", conv((3, 3), 16, 1, groups=2)),
        ("conv2d", "1x1 + residual", conv((1, 1), 16, 0, residual=True)),
        ("conv2d", "3x3 + residual", conv((3, 3), 16, 1, residual=True)),
        # 128 channels on a 9x9 image: three tiles and a long reduction, so split-K (4 to 9 slices on an H100)
        ("conv2d", "3x3 split-K", conv((3, 3), 128, 1)),
        ("conv2d", "3x3 split-K + residual", conv((3, 3), 128, 1, residual=True)),
        ("conv_bn_relu", "training", cbr(True)),
        ("conv_bn_relu", "eval", cbr(False)),
        ("conv_bn_relu", "training + residual", cbr(True, residual=True)),
        ("conv_bn_relu", "eval + residual", cbr(False, residual=True)),
        ("conv_bn_relu", "training, split-K (statistics from the split sum)", cbr(True, c=128)),
        ("local_response_norm", "size 5", lrn(5)),
        ("local_response_norm", "size 4", lrn(4)),
        ("residual_add", "identity", residual(False)),
        ("residual_add", "option A", residual(True)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--backend",
        action="append",
        choices=["triton", "cuda"],
        help="backends to run (default: every available GPU backend)",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_run: no CUDA device", file=sys.stderr)
        return 2
    import cnnkern
    from cnnkern import _backend

    backends = args.backend or [b for b in ("triton", "cuda") if b in cnnkern.available_backends()]
    failures, ran = [], 0
    t0 = time.time()
    for backend in backends:
        for dtype in (torch.float16, torch.float32):
            for layout in ("contiguous", "channels_last", "strided"):
                for op, name, run in cases(backend, dtype, layout):
                    if backend not in _backend.AUTO_ORDER.get(op, ()):
                        continue  # no kernel for this op on this backend
                    label = f"{backend:6s} {op:20s} {name:22s} {str(dtype)[6:]:8s} {layout}"
                    try:
                        run()
                        torch.cuda.synchronize()
                        ran += 1
                        print(f"ok   {label}", flush=True)
                    except Exception as exc:  # report every failure, then fail
                        failures.append(label)
                        print(f"FAIL {label}: {type(exc).__name__}: {exc}", flush=True)
    print(f"sanitize_run: {ran} cases ran, {len(failures)} failed, backends {backends}, {time.time() - t0:.0f} s")
    if not ran:
        print("sanitize_run: nothing ran (no GPU backend available?)", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
