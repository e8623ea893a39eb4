"""Launching compiled Triton kernels without Triton's per-call Python.

``kernel[grid](*args)`` costs tens of microseconds of host time on every call: Triton binds the
arguments, computes their specialization key, looks the compiled kernel up, builds launch
metadata, and an autotuned kernel first goes through the autotuner. All of that depends only on
what this module calls a call's *signature*: every integer and bool argument's value, every
tensor's dtype and 16-byte alignment (what Triton specializes on), and the constexpr keyword
arguments; a float argument only by its type. So a :class:`Plan` is made once per signature,
through Triton's own path, and later calls with the same signature launch its compiled kernel
directly (``CompiledKernel.run``, Triton's C launcher).

A signature holds exact values wherever Triton specializes, so a plan is never reused for a
call that Triton would have compiled differently. The direct launch is skipped, and Triton's
own path taken, under the interpreter, while Triton's launch hooks are installed (profilers),
and for a kernel whose constexpr parameters do not all follow its runtime ones.
"""

from __future__ import annotations

import torch
import triton
from triton import knobs

from . import INTERPRET

_Tensor = torch.Tensor


def signature(args, kwargs) -> tuple:
    """What a compiled kernel depends on: tensors by dtype and 16-byte alignment, floats by type
    (Triton never specializes a float argument on its value), other scalars by value, and the
    keyword (constexpr) values."""
    return (
        tuple(
            (a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, _Tensor) else float if type(a) is float else a
            for a in args
        ),
        *kwargs.values(),
    )


def hooks_active() -> bool:
    """Whether a Triton launch hook is installed: a hook chain (Triton >= 3.7) with calls in it,
    or a hook function (Triton 3.6)."""
    rt = knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    return bool(
        (enter is not None and getattr(enter, "calls", True)) or (leave is not None and getattr(leave, "calls", True))
    )


def _generated_launcher(run) -> bool:
    """Whether ``run`` is Triton 3.6's launcher object with its generated C function called as
    it is (no scratch memory to allocate, no tensor descriptors to expand)."""
    return (
        type(run).__name__ == "CudaLauncher"
        and type(getattr(run, "launch", None)).__name__ == "builtin_function_or_method"
        and not getattr(run, "global_scratch_size", 1)
        and not getattr(run, "profile_scratch_size", 1)
        and hasattr(run, "launch_cooperative_grid")
        and hasattr(run, "launch_pdl")
    )


class Plan:
    """One compiled kernel with its launch grid and constexpr tail, for one call signature:
    ``plan(args)`` launches it on the current stream with the call's runtime arguments and
    returns True, or returns False, launching nothing, when the current device is not the one
    the kernel was loaded on (then Triton's own path loads it there)."""

    __slots__ = (
        "run",
        "direct",
        "types",
        "flags",
        "codes",
        "function",
        "metadata",
        "grid",
        "tail",
        "device",
        "get_device",
        "get_stream",
    )

    def __init__(self, compiled, grid, tail):
        self.run = run = compiled.run  # Triton's launcher (the compiled kernel is loaded by now)
        # Triton >= 3.7's launcher object wraps one C function, and for a kernel that needs no
        # scratch memory and no sanitizer its __call__ only forwards the arguments to it:
        # ``direct`` is (that function, cooperative-grid flag, PDL flag, argument annotations,
        # signature) for such a kernel, so a plan can call it with the same arguments itself.
        utils = triton.runtime.driver.active.utils
        self.direct = None
        if (
            getattr(run, "launch", None) is getattr(utils, "launch", False)
            and hasattr(run, "arg_annotations")
            and not run.global_scratch_size
            and not run.profile_scratch_size
            and not getattr(run, "gsan_enabled", False)
        ):
            self.direct = (
                run.launch,
                run.launch_cooperative_grid,
                run.launch_pdl,
                run.arg_annotations,
                run.kernel_signature,
            )
        # What a replay in C++ needs to pack the arguments itself and launch through the driver
        # (cnnkern/ops/_plan.py: _native), for a launcher whose packing it can repeat: Triton >=
        # 3.7's C function above, or Triton 3.6's launcher generated for the kernel, where it
        # needs no scratch memory and takes no tensor descriptors. ``types``: the type of each
        # parameter ("constexpr" for one compiled in, a specialised 1 among them); ``flags``:
        # (cooperative grid, PDL); ``codes``: Triton >= 3.7's extractor code of each runtime
        # parameter (None for Triton 3.6, whose launcher is generated from ``types`` alone).
        self.flags = self.codes = None
        if self.direct is not None:
            self.flags, self.codes = (run.launch_cooperative_grid, run.launch_pdl), run.kernel_signature
        elif _generated_launcher(run):
            self.flags = (run.launch_cooperative_grid, run.launch_pdl)
        src = getattr(compiled, "src", None)
        types = tuple(getattr(src, "signature", {}).values())
        self.types = types if self.flags is not None and all(type(t) is str for t in types) else None
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        self.grid = grid
        self.tail = tail
        driver = triton.runtime.driver.active
        self.get_device, self.get_stream = driver.get_current_device, driver.get_current_stream
        self.device = self.get_device()  # Triton loads a kernel on the current device, as here

    def __call__(self, args, grid=None) -> bool:
        device = self.get_device()
        if device != self.device:
            return False
        g = self.grid if grid is None else grid
        if self.direct is not None:
            c_launch, coop, pdl, ann, sig = self.direct
            c_launch(
                g[0],
                g[1],
                g[2],
                self.get_stream(device),
                self.function,
                coop,
                pdl,
                self.metadata,
                None,
                None,
                None,
                None,
                None,
                ann,
                sig,
                (*args, *self.tail),
            )
        else:
            self.run(
                g[0],
                g[1],
                g[2],
                self.get_stream(device),
                self.function,
                self.metadata,
                None,
                None,
                None,
                *args,
                *self.tail,
            )
        if RECORD is not None:
            RECORD.add(("launch", self, args, g))
        return True


# While a call is recorded into a plan (cnnkern/ops/_plan.py), the list its work is recorded in:
# each direct launch adds ("launch", plan, runtime arguments, grid), each allocation through
# alloc() adds ("alloc", tensor, zeroed); a launch through Triton's own path (a first launch, or
# under launch hooks or the interpreter) adds ("miss",): the next call records again; tensor
# work outside the kernels adds ("never",): calls of that key are not planned.
RECORD = None


def record_miss(again: bool) -> None:
    if RECORD is not None:
        RECORD.add(("miss",) if again else ("never",))


def alloc(shape, dtype: torch.dtype, device, zero: bool = False) -> torch.Tensor:
    """A launcher's workspace: ``torch.empty`` (``torch.zeros`` when ``zero``), recorded."""
    t = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
    if RECORD is not None:
        RECORD.add(("alloc", t, zero))
    return t


def make_plan(jit_fn, compiled, args, kwargs, grid) -> Plan | None:
    """The plan of a call that Triton just compiled (``compiled``, its CompiledKernel) for
    ``jit_fn`` with positional runtime ``args`` and keyword ``kwargs`` (constexprs and, for an
    autotuned kernel, the chosen configuration's values); ``grid`` a tuple or Triton's callable
    of the bound arguments. None where the kernel's parameters do not allow a direct launch."""
    if compiled is None or not hasattr(compiled, "packed_metadata"):
        return None
    params = jit_fn.params
    if any(not p.is_constexpr for p in params[len(args) :]):
        return None
    named = dict(zip(jit_fn.arg_names, args))
    tail = []
    for p in params[len(args) :]:
        if p.name in kwargs:
            value = kwargs[p.name]
        elif p.has_default:
            value = p.default
        else:
            return None
        named[p.name] = value
        tail.append(value)
    if callable(grid):
        grid = grid(named)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return Plan(compiled, grid, tuple(tail))


PLANS: dict = {}


def direct_ok() -> bool:
    """Whether launches may go direct: compiled kernels (not the interpreter) and no launch hooks."""
    return not INTERPRET and not hooks_active()


def launch_planned(key, args, grid=None) -> bool:
    """Launch the plan kept for ``key`` with ``args``; False when there is none or it declines."""
    plan = PLANS.get(key)
    return plan is not None and plan(args, grid)


def run_and_keep(key, jit_fn, grid, args, kwargs) -> None:
    """``jit_fn[grid](*args, **kwargs)`` through Triton, its compiled kernel kept as the plan of
    ``key`` for the calls that follow."""
    record_miss(again=True)
    compiled = jit_fn.run(*args, grid=grid, warmup=False, **kwargs)
    plan = make_plan(jit_fn, compiled, args, kwargs, grid)
    if plan is not None:
        PLANS.setdefault(key, plan)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for a plain ``@triton.jit`` kernel, through its plan
    when one exists for the call's signature (``grid`` a tuple of 1 to 3 ints)."""
    if not direct_ok():
        record_miss(again=True)
        kernel[grid](*args, **kwargs)
        return
    key = (kernel, signature(args, kwargs))
    if not launch_planned(key, args, grid if len(grid) == 3 else (*grid, 1, 1)[:3]):
        run_and_keep(key, kernel, grid, args, kwargs)
