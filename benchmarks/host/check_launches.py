"""Checks, under the stand-in driver, that a warm call's launches (kernels/_launch.py and
cnnkern/ops/_plan.py: replays in C++, which launch through the driver themselves, and in Python,
through Triton's C launcher) give the driver exactly what Triton's own path gives it.

Run by tests/test_host_cost.py in a child process that benchmarks/bench_host.py prepares. For each
call: warm it (plans made), record the driver's launches of one warm call, then install a Triton
launch hook (which sends every launch through Triton's own JIT path and its launcher) and record
the same call again. The two records must match launch for launch: function, grid, block, shared
memory, stream, launch attributes, and every parameter's bytes (as many as its type takes), a
pointer named by what it points to (which of the call's inputs, or which other buffer). Prints
one line per call and exits non-zero on a mismatch.
"""

from __future__ import annotations

import ctypes
import sys

from benchmarks import bench_host

LOG: list = []  # the pools of the replays (their buffers kept alive), and the calls of Triton's C launcher

# the bytes of a parameter of each type Triton's C launcher packs: by Triton >= 3.7's signature
# bytes (1 a pointer), and by Triton 3.6's types (its launcher holds each in its C type)
_SIZES = {1: 8, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 2, 8: 4, 9: 8, 10: 2, 11: 2, 12: 4, 13: 8}
_TYPE_SIZES = {"i1": 1, "i8": 1, "i16": 2, "i32": 4, "i64": 8, "u1": 1, "u8": 1, "u16": 2, "u32": 4, "u64": 8}
_TYPE_SIZES.update({"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8})


def _params(plan) -> tuple[list, set] | None:
    """The bytes of each parameter the launcher of ``plan`` (kernels/_launch.py) passes the
    driver, Triton's two scratch pointers last, and the places of the pointers among them; None
    where they are not known."""
    if plan.codes is not None:
        codes = [*plan.codes, 1, 1]
        return [_SIZES[c] for c in codes], {i for i, c in enumerate(codes) if c == 1}
    if plan.types is None:
        return None
    runtime = [t for t in plan.types if t != "constexpr"] + ["*", "*"]
    if any(t not in _TYPE_SIZES and not t.startswith("*") for t in runtime):
        return None
    sizes = [8 if t.startswith("*") else _TYPE_SIZES[t] for t in runtime]
    return sizes, {i for i, t in enumerate(runtime) if t.startswith("*")}


def _record(real):
    def launch(*a):
        LOG.append(a)
        return real(*a)

    return launch


class _Driver:
    """The stand-in driver's launch record: each launch's function, grid, block, shared memory,
    stream, number of launch attributes and parameters (those of the functions given sizes)."""

    def __init__(self, lib):
        self.lib = lib
        lib.cnnkern_stub_recorded.restype = ctypes.c_ulong
        lib.cnnkern_stub_recorded.argtypes = [ctypes.POINTER(ctypes.POINTER(ctypes.c_ulonglong))]
        lib.cnnkern_stub_param_sizes.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
        self.pointers: dict = {}  # function -> its pointer parameters' places

    def know(self, plans) -> None:
        """Give the driver the parameter sizes of the kernels of ``plans`` (kernels/_launch.py)."""
        for plan in plans:
            params = _params(plan)
            if params is None or plan.function in self.pointers:
                continue
            sizes, pointers = params
            if self.lib.cnnkern_stub_param_sizes(plan.function, len(sizes), bytes(sizes)) != 0:
                raise SystemExit("check_launches: the stand-in driver keeps no more kernels")
            self.pointers[plan.function] = pointers

    def start(self) -> None:
        self.lib.cnnkern_stub_record(1)

    def stop(self) -> list:
        words = ctypes.POINTER(ctypes.c_ulonglong)()
        n = self.lib.cnnkern_stub_recorded(ctypes.byref(words))
        self.lib.cnnkern_stub_record(0)
        if n == 0:
            return []
        w, out, i = words[:n], [], 0
        while i < n:
            count = w[i + 10]
            out.append((tuple(w[i : i + 10]), tuple(w[i + 11 : i + 11 + count])))
            i += 11 + count
        return out


def _norm(launches, inputs, pointers):
    """The launches with each pointer parameter named by its address: the call's input i
    ("in", i), null, or the j-th other address the launches pass, in order of first use ("t", j),
    so that a launch given the wrong tensor (an input for another, one workspace for another)
    differs."""
    names = {t.data_ptr(): ("in", i) for i, t in enumerate(inputs)}
    names[0] = ("null",)
    out = []
    for config, params in launches:
        places = pointers.get(config[0], set())
        named = tuple(
            ("pointer", names.setdefault(v, ("t", len(names)))) if k in places else v for k, v in enumerate(params)
        )
        out.append((config, named))
    return out


def _keep_replayed_buffers(lib):
    """Keep every tensor a planned call's replay makes alive until LOG is cleared: the replay
    passes its launches addresses, so the record alone does not hold the buffers, and a buffer
    freed within the call could lend its address to a later one (then one name would mean two).
    The pool a replay returns (C++ or Python) holds all of them. Each replay's entry says how
    many launches it made, and how many of them through Triton's C launcher."""
    from cnnkern.ops import _plan

    _plan.KEEP_POOL = True  # (the C++ replays return every tensor they make)
    run = _plan.Replay.__call__

    def replay(self, *a, **k):
        before, logged = lib.cnnkern_stub_launches(), len(LOG)
        pool = run(self, *a, **k)
        if pool is not None:
            through = sum(type(e) is tuple for e in LOG[logged:])
            LOG.append({"pool": pool, "launches": lib.cnnkern_stub_launches() - before, "c_launcher": through})
        return pool

    _plan.Replay.__call__ = replay


def _hook(runtime, hook, on: bool) -> None:
    """Install (``on``) or remove ``hook`` as Triton's launch-enter hook: one of a hook chain in
    Triton >= 3.7, the hook function in Triton 3.6."""
    chain = runtime.launch_enter_hook
    if hasattr(chain, "add"):
        (chain.add if on else chain.remove)(hook)
    else:
        runtime.launch_enter_hook = hook if on else None


def main() -> int:
    lib = bench_host._install_stand_in()
    driver = _Driver(lib)
    import triton

    # before any kernel loads: every launcher records its calls (Triton >= 3.7: the C function
    # every launcher object calls; Triton 3.6: the launcher objects themselves)
    utils = triton.runtime.driver.active.utils
    if hasattr(utils, "launch"):
        utils.launch = _record(utils.launch)
    else:
        from triton.backends.nvidia import driver as nvidia

        nvidia.CudaLauncher.__call__ = _record(nvidia.CudaLauncher.__call__)
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
        "conv-BN-ReLU training step, dense gradient": (
            lambda: torch.autograd.grad(cbr(xg), [xg, *cbr.parameters()], gy1),
            (xg, *cbr.parameters(), gy1),
        ),
    }
    _keep_replayed_buffers(lib)
    hook = lambda *a, **k: None  # noqa: E731
    bad = 0
    from cnnkern.kernels import _launch
    from cnnkern.ops import _plan

    # the replays in C++ (cnnkern._host, where built) and in Python: the plans made again for each
    executors = [("C++", _plan._host), ("Python", None)] if _plan._host is not None else [("Python", None)]
    for executor, host in executors:
        _plan._host = host
        _plan.PLANS.clear()
        for name, (call, inputs) in calls.items():
            for _ in range(3):
                call()
            driver.know(_launch.PLANS.values())
            LOG.clear()
            driver.start()
            call()
            fast = driver.stop()
            replays = [e for e in LOG if type(e) is dict]  # the warm call's replays
            in_replays = sum(e["launches"] for e in replays)
            through = sum(e["c_launcher"] for e in replays)  # replayed launches through Triton's C launcher
            _hook(triton.knobs.runtime, hook, True)
            driver.start()
            call()
            slow = driver.stop()
            _hook(triton.knobs.runtime, hook, False)
            fast_n, slow_n = _norm(fast, inputs, driver.pointers), _norm(slow, inputs, driver.pointers)
            # the C++ replays launch through the driver themselves where they can repeat Triton's
            # launcher's packing (kernels/_launch.py: Plan.types), the Python ones through Triton's
            native = all(p.types is not None for p in _launch.PLANS.values())
            want = 0 if executor == "C++" and native else in_replays
            ok = fast_n == slow_n and len(fast) > 0 and replays and through == want
            bad += not ok
            print(
                f"{'ok' if ok else 'MISMATCH'}: {name} ({executor} replay): {len(fast)} launches, {in_replays} "
                f"replayed ({len(replays)} replays; {in_replays - through} by the replay itself), "
                f"{len(slow)} through Triton"
            )
            if not ok:
                print("  replay:", fast_n, "\n  triton:", slow_n)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
