"""Warm eager calls replayed from a plan: one dictionary lookup, the allocations, the launches.

Every public op has one route: ``cnnkern.functional`` validates the arguments, picks the backend
and calls the registered op (``torch.ops.cnnkern.*``), whose implementation allocates the outputs
and calls a backend's launchers; the op's autograd formula calls the backward ops the same way.
That route runs on the first eager call of each *call key*: every tensor argument's type, shape,
strides, dtype, device, ``requires_grad`` and 16-byte alignment, every other argument, and the
global state the route reads (backend default, grad mode, deterministic mode, TF32). While it
runs, its work is recorded (cnnkern/ops/_common.py: Recording): the outputs and workspaces it
allocates, the Triton kernels it launches directly (kernels/_launch.py) and the CUDA C++ ops it
calls. The call is kept as a plan of that work; later calls with the same key allocate and launch
the same way with their own tensors. The key holds everything the route decides from, so the
validation a plan skips would pass again and the layouts and launch arguments it computed are
the same.

A call that needs autograd is kept as a :class:`GradPlan`: an autograd.Function that replays the
forward, saves what the op's own ``setup_context`` saves, and in the backward replays the work
that the op's own backward formula recorded on the first backward with the same gradient key
(double backward, ``create_graph=True``, runs the formula through the ops).

Not planned (the route runs every time): calls under torch.compile, tensor subclasses, torch-
function or dispatch modes, functorch transforms, autocast, Triton launch hooks, the interpreter,
NaN-poisoned outputs (CNNKERN_POISON), and calls whose work a plan cannot replay (a launch
through Triton's own path, PyTorch tensor work outside the kernels, a tensor made any other way).
"""

from __future__ import annotations

import operator
import os
import struct
import sys
import warnings
import weakref

import torch

from . import _common

# The host side in C++ (csrc/host/host.cpp): the keys' tensor part and the replays, each one call.
# Where it is not built, the same work runs in Python (tkey, state, Replay.__call__).
try:
    from cnnkern import _host
except ImportError as exc:
    _host = None
    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if any(f.startswith("_host") and f.endswith((".so", ".pyd")) for f in os.listdir(_here)):
        warnings.warn(
            f"cnnkern._host exists but failed to load ({exc}): warm calls run their host work in Python. "
            "Rebuild it: pip install --no-build-isolation --no-deps -e .",
            stacklevel=2,
        )
else:
    _host.set_tensor_types(torch.Tensor, torch.nn.Parameter)

_Tensor = torch.Tensor
_empty_strided = torch.empty_strided
_as_strided = torch.as_strided
_increment_version = torch._C._increment_version
# what eager() reads (torch.compile recognises torch.compiler.is_compiling by the function itself)
_is_compiling = torch.compiler.is_compiling
_torch_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_transforms = torch._C._are_functorch_transforms_active
_autocast = torch._C._is_any_autocast_enabled
# what torch.utils._python_dispatch._get_current_dispatch_mode() reads, without its Python frame
_dispatch_modes = torch._C._len_torch_dispatch_stack
_allow_tf32 = torch._C._get_cudnn_allow_tf32  # torch.backends.cudnn.allow_tf32
_deterministic = torch._C._get_deterministic_algorithms  # torch.are_deterministic_algorithms_enabled()
PLANS: dict = {}  # call key -> OpPlan, GradPlan or FoldPlan, or None for a key whose calls cannot be planned
MAX_PLANS = 4096  # a process that makes more keys (every input shape a new one) starts again from none


def _keep(key, plan) -> None:
    if len(PLANS) >= MAX_PLANS:
        PLANS.clear()
    PLANS[key] = plan


def eager() -> bool:
    """Whether this call may be planned or replayed: plain eager mode (no torch.compile, torch
    function or dispatch mode, functorch transform or autocast). Triton's launch hooks are
    checked by the plan itself."""
    return not (
        _is_compiling() or _torch_function_modes() or _functorch_transforms() or _autocast() or _dispatch_modes()
    )


_PLANNED_TYPES = (torch.Tensor, torch.nn.Parameter)


def tkey(t):
    """The part of a call key that a tensor argument (or None) contributes: its class (a plain
    tensor or a Parameter; TypeError for any other object), shape, strides, dtype, device,
    ``requires_grad`` and 16-byte alignment."""
    if t is None:
        return None
    if type(t) not in _PLANNED_TYPES:
        raise TypeError("not a plain tensor")
    return type(t), t.shape, t.stride(), t.dtype, t.device, t.requires_grad, t.data_ptr() & 15


def state() -> tuple:
    """The global state every op's route reads: grad mode, deterministic mode, TF32."""
    return torch.is_grad_enabled(), _deterministic(), _allow_tf32()


def tensors_key(*tensors):
    """The part of a call key that its tensor arguments (each a tensor or None) and the global
    state contribute (:func:`tkey` of each, then :func:`state`); TypeError for an argument that
    is not a plain tensor or None. One C++ call where cnnkern._host is built."""
    if _host is not None:
        return _host.tensors_key(*tensors)
    return (*map(tkey, tensors), state())


def _pick(idx):
    """A function of the pool that returns the tensors at ``idx`` as a tuple."""
    if len(idx) == 1:
        i = idx[0]
        return lambda pool: (pool[i],)
    return operator.itemgetter(*idx)


class Replay:
    """The recorded work of one call: ``replay(tensors)`` runs it with the call's tensors and
    returns the pool (the tensors, then every tensor the work made; in C++, None in the places
    other than its outputs, which are freed as the replay ends), or None when it may not run
    now: Triton's launch hooks are installed, or the current device is not the one its kernels
    were loaded on (the caller runs the route instead). ``stream()`` says the same beforehand:
    the stream to launch on (None for work without Triton launches), or False."""

    __slots__ = (
        "allocs",
        "views",
        "steps",
        "dirty",
        "outs",
        "program",
        "kernel_device",
        "get_device",
        "get_stream",
        "hooks_active",
    )

    def stream(self):
        if self.get_device is None:
            return None
        device = self.get_device()
        if device != self.kernel_device or self.hooks_active():
            return False
        return self.get_stream(device)

    def __call__(self, tensors, stream=False):
        if stream is False:
            stream = self.stream()
            if stream is False:
                return None
        if self.program is not None:  # the same work, in C++
            return self.program(tensors, stream)
        pool = [*tensors]
        for shape, strides, dtype, device, zero in self.allocs:
            t = _empty_strided(shape, strides, dtype=dtype, device=device)
            pool.append(t.zero_() if zero else t)
        for base, size, stride, delta in self.views:
            b = pool[base]
            pool.append(_as_strided(b, size, stride, b.storage_offset() + delta))
        for step in self.steps:
            if step[0] == 0:  # the C launcher: the stream fourth, the kernel's arguments in one tuple
                fn, head, tail, pick = step[1], step[2], step[4], step[5]
                fn(head[0], head[1], head[2], stream, *head[3:], (*pick(pool), *tail))
            elif step[0] == 1:  # the launcher object: the kernel's arguments spread
                fn, head, tail, pick = step[1], step[2], step[4], step[5]
                fn(head[0], head[1], head[2], stream, *head[3:], *pick(pool), *tail)
            else:  # a CUDA C++ op: (2, op, args with pool indices, number of tensors it returns)
                _, op, spec, n_out = step
                out = op(*[pool[v] if is_t else v for is_t, v in spec])
                if n_out == 1:
                    pool.append(out)
                elif n_out:
                    pool.extend(out)
        if self.dirty:  # inputs the work wrote in place: their versions bumped, as the route bumps them
            _increment_version([pool[i] for i in self.dirty])
        return pool


_RETRY = object()


def _storage(t: _Tensor) -> int:
    return t.untyped_storage().data_ptr()


# Triton's C launcher: the extractor of each parameter type, as Triton >= 3.7's signature bytes
# name it, and the bytes a scalar of the type takes ("*..." pointers: 1, 8 bytes). Triton 3.6's
# generated launcher holds each parameter in its C type: as many bytes, or fewer (i1 and u1 in one
# byte, a 0 or 1 in the first of the four packed here).
_EXTRACTORS = {
    "i1": (4, 4),
    "i8": (2, 1),
    "i16": (3, 2),
    "i32": (4, 4),
    "i64": (5, 8),
    "u1": (8, 4),
    "u8": (6, 1),
    "u16": (7, 2),
    "u32": (8, 4),
    "u64": (9, 8),
    "fp32": (12, 4),
    "fp64": (13, 8),
}


def _native(plan, grid, places, tail, scalar_places):
    """A launch that cnnkern._host makes through the driver itself (cuLaunchKernel), its
    parameters packed here as Triton's C launcher packs them: (function, grid x, y, z, threads
    per block, shared memory bytes, the parameters (8 bytes each, constants in place, then
    Triton's two scratch pointers, null), ((parameter, pool place, 0: a tensor's address | 1:
    a call's float as fp32 | 2: as fp64), ...)). None where Triton's C launcher must launch it:
    launch attributes (clusters, cooperative grid, PDL, oversized shared memory), types it packs
    otherwise (fp16, bf16, descriptors, tuples), or a signature that differs from its own."""
    types, metadata = plan.types, plan.metadata
    if types is None or len(types) != len(places) + len(tail):
        return None
    if not (type(metadata) is tuple and len(metadata) == 3 and all(type(v) is int for v in metadata)):
        return None  # (Triton's (num_warps, num_ctas, shared memory), packed otherwise)
    num_warps, num_ctas, shared = metadata
    coop, pdl = plan.flags
    if num_ctas != 1 or coop or pdl or shared > 228 * 1024:
        return None
    slots, patches, extractors = [], [], []
    for i, ty in enumerate(types):
        if ty == "constexpr":
            continue
        pointer = ty.startswith("*")
        if not pointer and ty not in _EXTRACTORS:
            return None
        extractors.append(1 if pointer else _EXTRACTORS[ty][0])
        if i < len(places):
            place = places[i]
            if place in scalar_places:
                if ty not in ("fp32", "fp64"):
                    return None
                kind = 1 if ty == "fp32" else 2
            elif pointer:
                kind = 0
            else:
                return None
            patches.append((len(slots), place, kind))
            slots.append(bytes(8))
            continue
        v = tail[i - len(places)]
        if pointer and (v is None or type(v) is int):
            b = (v or 0).to_bytes(8, "little")
        elif ty in ("fp32", "fp64") and type(v) in (float, int):
            b = struct.pack("<f" if ty == "fp32" else "<d", float(v))
        elif not pointer and ty[0] in "iu" and type(v) in (int, bool):
            n = _EXTRACTORS[ty][1]
            b = (int(v) & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
        else:
            return None
        slots.append(b.ljust(8, b"\0"))
    if (plan.codes is not None and extractors != list(plan.codes)) or len(slots) > 62:
        return None
    slots += [bytes(8)] * 2
    return (plan.function, *grid, 32 * num_warps, shared, b"".join(slots), tuple(patches))


# Whether a replay in C++ returns every tensor it made (benchmarks/host/check_launches.py keeps
# them alive, so that no two buffers of one call share an address), not only its outputs.
KEEP_POOL = False


def build(recorded, inputs, outputs):
    """The :class:`Replay` of ``recorded`` (a Recording) run with ``inputs`` (tensors, None, or
    floats: the call's scalars, which its launches and op calls take as they are; each must be
    an object of its own, so that it is found by identity), with ``outputs`` as its outputs;
    ``_RETRY`` when the work missed (compiled or tuned this time: the next call records again),
    None when it cannot be replayed."""
    if any(e[0] == "never" for e in recorded):
        return None
    if recorded.spoilt or any(e[0] == "miss" for e in recorded):
        return _RETRY
    work = [e for e in recorded if e[0] in ("launch", "call")]
    if not work:
        return None
    index: dict[int, int] = {}  # id(tensor or scalar) -> its place in the pool
    pool: list = []
    for t in inputs:
        if t is not None:
            if id(t) in index:  # one tensor passed twice: a later call may pass two
                return None
            index[id(t)] = len(pool)
        pool.append(t)
    scalars = {id(t) for t in inputs if type(t) is float}
    dirty = []  # the places of the inputs the work writes in place
    for e in recorded:
        if e[0] == "dirty":
            for t in e[1]:
                i = index.get(id(t))
                if i is None or id(t) in scalars:
                    return None  # (a tensor the call did not pass)
                dirty.append(i)
    # what the work and the outputs use: by identity, or (a view) through a storage
    used = [a for e in work for a in e[2] if isinstance(a, _Tensor)] + [t for t in outputs if t is not None]
    used_ids = {id(t) for t in used}
    used_storages = {_storage(t) for t in used if id(t) not in index and t.numel()}
    allocs = []
    for e in recorded:
        if e[0] == "alloc":
            t = e[1]
            if id(t) in used_ids or (t.numel() and _storage(t) in used_storages):
                if id(t) in index:
                    return None
                index[id(t)] = len(pool)
                pool.append(t)
                allocs.append((tuple(t.shape), t.stride(), t.dtype, t.device, e[2]))
    made_by_calls = {
        id(t) for e in work if e[0] == "call" for t in ((e[3],) if isinstance(e[3], _Tensor) else e[3] or ())
    }
    views = []
    n_bases = len(pool)  # the inputs and the allocations: what a view may be a view of

    def place(a):
        """The pool index of tensor ``a``: a pool tensor itself, or a view of one (added)."""
        i = index.get(id(a))
        if i is not None or id(a) in made_by_calls:
            return i
        if not a.numel():
            return None
        ptr = _storage(a)
        bases = [j for j, t in enumerate(pool[:n_bases]) if t is not None and t.numel() and _storage(t) == ptr]
        if len(bases) != 1:
            return None  # no base (a tensor made otherwise, or by a CUDA C++ op) or an ambiguous one
        base = pool[bases[0]]
        views.append((bases[0], tuple(a.shape), a.stride(), a.storage_offset() - base.storage_offset()))
        index[id(a)] = len(pool)
        pool.append(a)
        return index[id(a)]

    # the views first (their bases are inputs or allocations), then the steps in order
    for e in work:
        for a in e[2]:
            if isinstance(a, _Tensor) and id(a) not in made_by_calls and place(a) is None:
                return None
    scalar_places = {index[i] for i in scalars}
    # (0, C launcher, its fixed arguments, tensor places, tail, picker, native launch or None),
    # (1, launcher object, its fixed arguments, tensor places, tail, picker, native launch or None),
    # (2, op, spec, n_out)
    steps = []
    first = None
    for e in work:
        if e[0] == "launch":
            _, plan, args, grid = e
            # the tensors and the call's scalars lead
            k = next((i for i, a in enumerate(args) if not (isinstance(a, _Tensor) or id(a) in scalars)), len(args))
            tail = tuple(args[k:])
            if any(isinstance(a, _Tensor) or id(a) in scalars for a in tail):
                return None
            idx = [index.get(id(a)) for a in args[:k]]
            if None in idx:
                return None
            first = first or plan
            g = (grid[0], grid[1], grid[2])
            tail = tail + plan.tail
            native = _native(plan, g, idx, tail, scalar_places)
            if plan.direct is not None:  # Triton's C launcher itself (kernels/_launch.py: Plan.direct)
                c_launch, coop, pdl, ann, sig = plan.direct
                head = (*g, plan.function, coop, pdl, plan.metadata, None, None, None, None, None, ann, sig)
                steps.append((0, c_launch, head, tuple(idx), tail, _pick(idx), native))
            else:  # Triton's launcher object
                head = (*g, plan.function, plan.metadata, None, None, None)
                steps.append((1, plan.run, head, tuple(idx), tail, _pick(idx), native))
        else:
            _, op, args, out = e
            spec = []
            for a in args:
                if isinstance(a, _Tensor) or id(a) in scalars:
                    i = index.get(id(a))
                    if i is None:
                        return None
                    spec.append((True, i))
                elif isinstance(a, (list, tuple)) and any(isinstance(v, _Tensor) for v in a):
                    return None
                else:
                    spec.append((False, a))
            made = (out,) if isinstance(out, _Tensor) else (out or ())
            for t in made:
                if id(t) in index:
                    return None
                index[id(t)] = len(pool)
                pool.append(t)
            steps.append((2, op, tuple(spec), 1 if isinstance(out, _Tensor) else len(made)))
    outs = []
    for t in outputs:
        i = None if t is None else index.get(id(t))
        if t is not None and i is None:
            return None
        outs.append(i)
    r = Replay()
    r.allocs, r.views, r.steps, r.dirty, r.outs = tuple(allocs), tuple(views), tuple(steps), tuple(dirty), tuple(outs)
    # the C++ program returns the inputs and the outputs (what a plan saves is among them)
    keep = None if KEEP_POOL else [i for i in r.outs if i is not None]
    r.program = None if _host is None else _host.bind(_host.Program(r.allocs, r.views, r.steps, r.dirty, keep))
    r.kernel_device = r.get_device = r.get_stream = r.hooks_active = None
    if first is not None:
        launch = sys.modules["cnnkern.kernels._launch"]
        r.kernel_device, r.get_device, r.get_stream = first.device, first.get_device, first.get_stream
        r.hooks_active = launch.hooks_active
    return r


class OpPlan:
    """A call that needs no autograd: ``plan(*tensors)`` is its output, or None (run the route)."""

    __slots__ = ("replay", "out", "outs")

    def __init__(self, replay: Replay, single: bool):
        self.replay, self.out, self.outs = replay, replay.outs[0] if single else None, replay.outs

    def __call__(self, *tensors):
        pool = self.replay(tensors)
        if pool is None:
            return None
        return pool[self.out] if self.out is not None else tuple(pool[i] for i in self.outs)


class _Ctx:
    """What an op's ``setup_context`` and backward formula see of autograd's ctx."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        self.non_differentiable = tensors


class GradPlan:
    """A call of one registered op that needs autograd: ``plan(*tensors)`` is its output (through
    :class:`_Replayed`), or None (run the route). The replays take the call's inputs that are
    not None (``present`` picks them; a call key fixes which are None); autograd is passed only
    those that are the op's tensor arguments (``through`` picks them; the others, running
    statistics updated in place and scalars, reach the replay beside it), and the formula's
    gradients are theirs: autograd is passed no more arguments than it needs, and returns no
    more outputs either: only the differentiable ones (``returns`` picks them from the pool, where
    the op's ``setup_context`` marks others non-differentiable; those come back beside autograd,
    and ``grads`` puts None in their place for the formula)."""

    __slots__ = (
        "fwd",
        "out",
        "saves",
        "attrs",
        "backward",
        "needs",
        "grad_of",
        "bwd",
        "present",
        "through",
        "diff",
        "returns",
        "outs",
    )

    def __call__(self, *tensors):
        stream = self.fwd.stream()
        if stream is False:
            return None
        if self.present is not None:
            tensors = self.present(tensors)
        through = tensors if self.through is None else self.through(tensors)
        if self.returns is None:
            return _Replayed.apply((self, stream, None, tensors), *through)
        box = []
        _Replayed.apply((self, stream, box, tensors), *through)  # (the outputs autograd returns are the pool's tensors)
        return self.outs(box[0])

    def grads(self, grads):
        """The gradients of all the op's outputs, given those of the differentiable ones."""
        full = [None] * len(self.fwd.outs)
        for i, g in zip(self.diff, grads):
            full[i] = g
        return full

    def formula(self, saved, grads, record: bool):
        """The call tensors' gradients from the op's own backward formula (through the ops),
        recorded into a backward :class:`Replay` when ``record``."""
        ctx = _Ctx(self.needs)
        ctx.__dict__.update(self.attrs)
        ctx.saved_tensors = saved
        if not record:
            op_grads = self.backward(ctx, *grads)
            return [None if i is None else op_grads[i] for i in self.grad_of]
        op_grads, recorded = _recorded(lambda: self.backward(ctx, *grads))
        out = [None if i is None else op_grads[i] for i in self.grad_of]
        replay = _RETRY if recorded is None else build(recorded, (*saved, *grads), out)
        if replay is not _RETRY:
            try:
                self.bwd[tensors_key(*grads)] = replay  # (the gradients' key)
            except TypeError:  # (a gradient of a tensor subclass: not replayed)
                pass
        return out


class _Replayed(torch.autograd.Function):
    """A planned call of an op under autograd: the forward and backward replayed."""

    @staticmethod
    def forward(ctx, call, *through):
        plan, stream, box, tensors = call  # (``through``: those of ``tensors`` autograd sees)
        pool = plan.fwd(tensors, stream)
        ctx.plan = plan
        ctx.save_for_backward(*[None if i is None else pool[i] for i in plan.saves])
        if plan.out is not None:
            return pool[plan.out]
        ctx.set_materialize_grads(False)  # (the gradients of outputs a formula ignores stay None)
        if box is not None:  # the non-differentiable outputs beside autograd
            box.append(pool)
            return plan.returns(pool)
        return tuple(pool[i] for i in plan.fwd.outs)

    @staticmethod
    def backward(ctx, *grads):
        plan = ctx.plan
        saved = ctx.saved_tensors
        if plan.returns is not None:
            grads = plan.grads(grads)
        if torch.is_grad_enabled():  # create_graph: the formula through the ops, which are differentiable
            return None, *plan.formula(saved, grads, False)
        try:
            replay = plan.bwd.get(tensors_key(*grads), _RETRY)
        except TypeError:  # (a gradient of a tensor subclass)
            replay = None
        if replay is not None and replay is not _RETRY:
            pool = replay((*saved, *grads))
            if pool is not None:
                return None, *[None if i is None else pool[i] for i in replay.outs]
        record = replay is _RETRY and _recording_ok()
        return None, *plan.formula(saved, grads, record)


def _recording_ok() -> bool:
    # (a Triton launch that cannot go direct, under the interpreter or launch hooks, records a miss)
    return not _common._POISON and _common.RECORD is None


def _grad_plan(recorded, tensors, out):
    """The :class:`GradPlan` of a recorded call that needs autograd, or None."""
    ops = [e for e in recorded if e[0] == "op"]
    if len(ops) != 1 or ops[0][3] is not out or not hasattr(ops[0][1], "formulas"):
        return None
    _, op, args, _ = ops[0]
    present = [i for i, t in enumerate(tensors) if t is not None]
    full = len(present) == len(tensors)
    tensors = tuple(tensors[i] for i in present)
    position = {id(t): j for j, t in enumerate(tensors)}
    if any(isinstance(a, _Tensor) and id(a) not in position for a in args):
        return None  # the op got a tensor the call did not pass (a cast, a copy)
    outputs = (out,) if isinstance(out, _Tensor) else out
    fwd = build(recorded, tensors, outputs)
    if fwd is None or fwd is _RETRY:
        return fwd
    made = {id(t): i for t, i in zip(outputs, fwd.outs)}
    setup, backward = op.formulas
    needs = tuple(isinstance(a, _Tensor) and a.requires_grad for a in args)
    ctx = _Ctx(needs)
    setup(ctx, args, out)
    saves = []
    for t in ctx.saved_tensors:
        if t is None:
            saves.append(None)
        elif id(t) in made:
            saves.append(made[id(t)])
        elif id(t) in position:
            saves.append(position[id(t)])
        else:
            return None
    plan = GradPlan()
    plan.fwd, plan.saves, plan.backward, plan.needs = fwd, tuple(saves), backward, needs
    plan.out = fwd.outs[0] if isinstance(out, _Tensor) else None
    plan.attrs = {
        k: v for k, v in vars(ctx).items() if k not in ("needs_input_grad", "saved_tensors", "non_differentiable")
    }
    arg_of = {id(a): i for i, a in enumerate(args) if isinstance(a, _Tensor)}
    # autograd sees only the op's tensor arguments; the call's other inputs (running statistics
    # updated in place, scalars) reach the replay beside it: each argument costs autograd
    through = [j for j, t in enumerate(tensors) if isinstance(t, _Tensor) and id(t) in arg_of]
    plan.through = None if len(through) == len(tensors) else _pick(through)
    plan.grad_of = tuple(arg_of[id(tensors[j])] for j in through)
    plan.bwd = {}
    plan.present = None if full else _pick(present)
    plan.returns = plan.diff = plan.outs = None
    non_diff = {id(t) for t in getattr(ctx, "non_differentiable", ())}
    if plan.out is None and non_diff:  # autograd returns only the differentiable outputs
        plan.diff = tuple(i for i, t in enumerate(outputs) if id(t) not in non_diff)
        if not plan.diff:
            return None
        places = [fwd.outs[i] for i in plan.diff]
        plan.returns = _pick(places) if len(places) > 1 else operator.itemgetter(places[0])
        plan.outs = _pick(fwd.outs)
    return plan


def _recorded(full):
    """(``full()``, the Recording of its work), the recording None when the Triton kernels were
    loaded during the call (their launchers did not record: the next call records)."""
    launch = sys.modules.get("cnnkern.kernels._launch")
    recorded = _common.start_recording()
    try:
        out = full()
    finally:
        _common.stop_recording()
    return out, recorded if sys.modules.get("cnnkern.kernels._launch") is launch else None


def run_and_plan(key, full, tensors):
    """``full()`` (the op's route, returning its output: a tensor or a tuple of tensors), recorded
    into a plan for ``key`` when the call may be replayed with ``tensors`` (tensors, None, or the
    call's float scalars: see :func:`build`). A key that has a plan reaches here only when the
    plan declined (launch hooks, another current device)."""
    if key is None or key in PLANS or not _recording_ok():
        return full()
    out, recorded = _recorded(full)
    if recorded is None:
        return out
    single = isinstance(out, _Tensor)
    if not single and not (type(out) is tuple and all(isinstance(t, _Tensor) for t in out)):
        plan = None
    elif torch.is_grad_enabled() and any(isinstance(t, _Tensor) and t.requires_grad for t in tensors):
        plan = _grad_plan(recorded, tensors, out)
    else:
        replay = build(recorded, tensors, (out,) if single else out)
        plan = OpPlan(replay, single) if isinstance(replay, Replay) else replay
    if plan is not _RETRY:
        _keep(key, plan)
    return out


class FoldPlan:
    """A convolution with BatchNorm folded into its weights (conv_bn_relu in eval): the folded
    weight and bias kept while the tensors they were folded from are the same tensors, unchanged
    (each in-place change bumps a tensor's version), and the convolution replayed with them.
    ``plan(x, sources)`` is the output, or None (run the route, which folds and plans again)."""

    __slots__ = ("refs", "versions", "weight", "bias", "replay", "out", "used")

    def __call__(self, x, sources):
        for ref, version, t in zip(self.refs, self.versions, sources):
            if t is None:
                if ref is not None:
                    return None
            elif (
                ref is None or ref() is not t or t._version != version or (t.requires_grad and torch.is_grad_enabled())
            ):
                return None
        pool = self.replay((x, self.weight, self.bias))
        if pool is None:
            return None
        self.used = True
        return pool[self.out]


def run_and_plan_folded(key, full, x, sources):
    """``full()`` (conv_bn_relu's route in eval), kept as a :class:`FoldPlan` for ``key``: recorded
    again when the kept one declines (new or changed BatchNorm tensors) after it was used; a key
    whose plan is stale before its first use (the tensors change on every call) is not planned."""
    kept = PLANS.get(key, _RETRY)
    if key is None or kept is None or not _recording_ok():
        return full()
    if kept is not _RETRY and not kept.used:
        PLANS[key] = None
        return full()
    out, recorded = _recorded(full)
    if recorded is None or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *sources))):
        return out  # (a fold that autograd records is not kept)
    ops = [e for e in recorded if e[0] == "op"]
    plan = None
    if len(ops) == 1 and ops[0][3] is out and ops[0][2][0] is x and isinstance(out, _Tensor):
        _, _, args, _ = ops[0]
        replay = build(recorded, (x, args[1], args[2]), (out,))
        if replay is _RETRY:
            return out
        if replay is not None:
            plan = FoldPlan()
            plan.refs = tuple(None if t is None else weakref.ref(t) for t in sources)
            plan.versions = tuple(None if t is None else t._version for t in sources)
            plan.weight, plan.bias = _shared_fold(sources, plan.refs, plan.versions, args[1], args[2])
            plan.replay, plan.out, plan.used = replay, replay.outs[0], False
    _keep(key, plan)
    return out


_FOLDS: dict = {}  # id()s of the folded tensors' sources -> (their weak references, versions, weight, bias)


def _shared_fold(sources, refs, versions, weight, bias):
    """The folded weight and bias of ``sources`` at ``versions``: the ones already kept for another
    key (another input shape) when they were folded from these very tensors, unchanged, so that
    each layer keeps one folded copy; else these (the fold is deterministic: a kept pair holds the
    same values in the same layout)."""
    ident = tuple(id(t) for t in sources)
    kept = _FOLDS.get(ident)
    if (
        kept is not None
        and kept[1] == versions
        and kept[2].shape == weight.shape
        and kept[2].stride() == weight.stride()
        and all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(kept[0], sources))
    ):
        return kept[2], kept[3]
    if kept is None and sources[0] is not None:
        weakref.finalize(sources[0], _FOLDS.pop, ident, None)  # forgotten with the convolution's weight
    _FOLDS[ident] = (refs, versions, weight, bias)
    return weight, bias


def op_call(op, *args):
    """``op(*args)``: a registered op called by an op's route, recorded as the call's op."""
    out = op(*args)
    if _common.RECORD is not None:
        _common.RECORD.add(("op", op, args, out))
    return out
