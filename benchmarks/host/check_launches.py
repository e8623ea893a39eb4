"""Checks, under the stand-in driver, that a warm call's direct launches (kernels/_launch.py and
cnnkern/ops/_plan.py) pass Triton's C launcher exactly what Triton's own path passes.

Run by tests/test_host_cost.py in a child process that benchmarks/bench_host.py prepares. For each
call: warm it (plans made), record the launches of one warm call, then install a Triton launch
hook (which sends every launch through Triton's own JIT path) and record the same call again.
The two records must match launch for launch: grid, function, flags, metadata, signature, and
every argument (tensors by memory address: which of the call's inputs, or which other buffer).
Prints one line per call and exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

from benchmarks import bench_host

LOG: list = []


def _record(real):
    def launch(*a):
        LOG.append(a)
        return real(*a)

    return launch


def _norm(records, inputs, pointers):
    """The launches with each tensor argument named by its memory address: the call's input i
    ("in", i), or the j-th other address the launches touch, in order of first use ("t", j), so
    that a launch given the wrong tensor (an input for another, one workspace for another)
    differs. ``pointers[k]`` holds the argument places of launch k that take a tensor on Triton's
    own path; a planned call's replay passes the same tensors there as device addresses (ints)."""
    import torch

    names = {t.data_ptr(): ("in", i) for i, t in enumerate(inputs)}
    out = []
    for a, places in zip(records, pointers):
        args = []
        for i, v in enumerate(a[15]):
            if i in places:
                address = v.data_ptr() if isinstance(v, torch.Tensor) else v
                v = ("pointer", names.setdefault(address, ("t", len(names))))
            elif isinstance(v, torch.Tensor):
                v = ("unexpected tensor", tuple(v.shape))
            args.append(v)
        out.append((a[0], a[1], a[2], a[4], a[5], a[6], a[7], id(a[13]), bytes(a[14]), tuple(args)))
    return out


def _tensor_places(records):
    import torch

    return [{i for i, v in enumerate(a[15]) if isinstance(v, torch.Tensor)} for a in records]


def _keep_replayed_buffers():
    """Keep every tensor a planned call's replay makes alive until LOG is cleared: the replay
    passes its launches addresses, so LOG alone does not hold the buffers, and a buffer freed
    within the call could lend its address to a later one (then one name would mean two). The
    pool a replay returns (C++ or Python) holds all of them."""
    from cnnkern.ops import _plan

    run = _plan.Replay.__call__

    def replay(self, *a, **k):
        pool = run(self, *a, **k)
        if pool is not None:
            LOG.append(pool)
        return pool

    _plan.Replay.__call__ = replay


def main() -> int:
    bench_host._install_stand_in()
    import triton

    utils = triton.runtime.driver.active.utils
    utils.launch = _record(utils.launch)  # before any kernel loads: every launcher takes the recorder
    import torch

    import cnnkern
    from cnnkern import functional as F

    bench_host._accept_cpu_tensors()
    bench_host._untimed_autotuning()
    torch.manual_seed(0)
    bf, cl = torch.bfloat16, torch.channels_last

    def t(*shape, dtype=bf, fmt=cl, grad=False):
        return torch.randn(*shape, dtype=dtype).to(memory_format=fmt).requires_grad_(grad)

    x, w, b = t(4, 32, 14, 14), t(48, 32, 3, 3), torch.randn(48, dtype=bf)
    xs = t(2, 3, 33, 33)
    w1 = t(64, 32, 1, 1)
    res = t(4, 64, 14, 14)
    xn = t(2, 16, 9, 9, dtype=torch.float32, fmt=torch.contiguous_format)
    wn = t(8, 4, 3, 3, dtype=torch.float32, fmt=torch.contiguous_format)
    r1, r2 = t(4, 64, 8, 8), t(4, 64, 8, 8)
    rs = t(4, 32, 16, 16)
    lx = t(2, 24, 7, 7)
    xg, wg, gy = t(4, 32, 14, 14, grad=True), t(48, 32, 3, 3, grad=True), t(4, 48, 7, 7)
    lg, lgy = t(2, 24, 7, 7, grad=True), t(2, 24, 7, 7)
    bg, gy1 = torch.randn(48, dtype=bf, requires_grad=True), t(4, 48, 14, 14)
    rg1, rg2, rgs = t(4, 64, 8, 8, grad=True), t(4, 64, 8, 8, grad=True), t(4, 32, 16, 16, grad=True)
    cbr = cnnkern.nn.ConvBNReLU2d(32, 48, 3, padding=1, backend="triton").to(bf, memory_format=cl).train()
    calls = {
        "conv 3x3 bias relu": (lambda: F.conv2d(x, w, b, padding=1, activation="relu", backend="triton"), (x, w, b)),
        "conv 3x3 stride 2": (lambda: F.conv2d(x, w, stride=2, padding=1, backend="triton"), (x, w)),
        "conv 1x1 stride 2": (lambda: F.conv2d(x, w1, stride=2, backend="triton"), (x, w1)),
        "conv 1x1 residual relu": (
            lambda: F.conv2d(x, w1, activation="relu", residual=res, backend="triton"),
            (x, w1, res),
        ),
        "conv small C": (lambda: F.conv2d(xs, t(16, 3, 7, 7), stride=2, padding=3, backend="triton"), (xs,)),
        "conv fp32 NCHW groups": (lambda: F.conv2d(xn, wn, padding=1, groups=4, backend="triton"), (xn, wn)),
        "residual add": (lambda: F.residual_add(r1, r2, backend="triton"), (r1, r2)),
        "residual add option A": (lambda: F.residual_add(r1, rs, backend="triton"), (r1, rs)),
        "local response norm": (lambda: F.local_response_norm(lx, 5, 5e-4, 0.75, 2.0, backend="triton"), (lx,)),
        "conv forward + backward": (
            lambda: torch.autograd.grad(F.conv2d(xg, wg, stride=2, padding=1, backend="triton"), (xg, wg), gy),
            (xg, wg, gy),
        ),
        "conv bias relu forward + backward": (
            lambda: torch.autograd.grad(
                F.conv2d(xg, wg, bg, padding=1, activation="relu", backend="triton"), (xg, wg, bg), gy1
            ),
            (xg, wg, bg, gy1),
        ),
        "conv forward + input gradient": (
            lambda: torch.autograd.grad(F.conv2d(xg, w, padding=1, backend="triton"), (xg,), gy1),
            (xg, w, gy1),
        ),
        "residual add forward + backward": (
            lambda: torch.autograd.grad(F.residual_add(rg1, rg2, backend="triton"), (rg1, rg2), r1),
            (rg1, rg2, r1),
        ),
        "residual add option A forward + backward": (
            lambda: torch.autograd.grad(F.residual_add(rg1, rgs, relu=False, backend="triton"), (rg1, rgs), r1),
            (rg1, rgs, r1),
        ),
        "local response norm backward": (
            lambda: torch.autograd.grad(F.local_response_norm(lg, 5, 5e-4, 0.75, 2.0, backend="triton"), (lg,), lgy),
            (lg, lgy),
        ),
        "conv-BN-ReLU training step": (
            lambda: torch.autograd.grad(cbr(xg).sum(), [xg, *cbr.parameters()]),
            (xg, *cbr.parameters()),
        ),
    }
    _keep_replayed_buffers()
    hook = lambda *a, **k: None  # noqa: E731
    bad = 0
    from cnnkern.ops import _plan

    # the replays in C++ (cnnkern._host, where built) and in Python: the plans made again for each
    executors = [("C++", _plan._host), ("Python", None)] if _plan._host is not None else [("Python", None)]
    for executor, host in executors:
        _plan._host = host
        _plan.PLANS.clear()
        for name, (call, inputs) in calls.items():
            for _ in range(3):
                call()
            LOG.clear()
            call()
            fast_log = [a for a in LOG if type(a) is tuple]
            fast_pools = list(LOG)
            triton.knobs.runtime.launch_enter_hook.add(hook)
            LOG.clear()
            call()
            slow_log = [a for a in LOG if type(a) is tuple]
            triton.knobs.runtime.launch_enter_hook.remove(hook)
            places = _tensor_places(slow_log)
            fast, slow = _norm(fast_log, inputs, places), _norm(slow_log, inputs, places)
            replayed = sum(type(a) is list for a in fast_pools)  # the warm call's replays (a pool each)
            ok = fast == slow and len(fast) > 0 and len(fast_log) == len(slow_log) and replayed > 0
            bad += not ok
            print(
                f"{'ok' if ok else 'MISMATCH'}: {name} ({executor} replay): {len(fast)} launches direct "
                f"({replayed} replays), {len(slow)} through Triton"
            )
            if not ok:
                print("  direct:", fast, "\n  triton:", slow)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
