"""Backend selection: ``"auto" | "triton" | "cuda" | "torch"``.

Rules (docs/design.md, docs/backends.md):

* ``"auto"`` (the default): a CUDA tensor goes to the preferred available GPU backend for that op
  (``AUTO_ORDER``), a CPU tensor to ``"torch"``. ``"auto"`` never raises for availability.
* ``"triton"`` on CPU tensors runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set
  before cnnkern's Triton kernels are first imported); otherwise it is an error that says so.
* ``"cuda"`` needs the compiled extension ``cnnkern._C`` and CUDA tensors.
* ``"torch"`` is the pure-PyTorch reference (cnnkern/reference.py) and is always available.

An explicitly requested backend that cannot run raises :class:`BackendUnavailableError` naming
what is missing and how to get it.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import sys

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
GPU_BACKENDS = ("cuda", "triton")

# The GPU backends that have kernels for each op, in the order "auto" tries them. A GPU backend
# not listed for an op has no kernel for it; "torch" serves every op. The order follows the one
# GPU run so far (H100, commit 5f0dac7, benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-25-5f0dac7):
#   residual add: CUDA C++ first: forward within 4% of Triton (1.59x vs 1.65x eager on 64 MB+
#     tensors), forward+backward clearly faster (1.22x vs 0.95x eager).
#   LRN: Triton first: faster in every measured case, forward (7.8x vs 6.1x eager on AlexNet's
#     norm1) and forward+backward (4.2x vs 3.5x).
#   convolution, conv-BN-ReLU: the CUDA C++ kernels are compiled and statically checked but have
#     not run on a GPU yet: Triton stays first until a GPU run validates and measures them.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "residual_add": ("cuda", "triton"),
    "local_response_norm": ("triton", "cuda"),
    "conv2d": ("triton", "cuda"),
    "conv_bn_relu": ("triton", "cuda"),
}

_ENV_VAR = "CNNKERN_BACKEND"
_TRUE = ("1", "true", "yes", "on")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says what is missing."""


# ----------------------------------------------------------------------------------------------
# The compiled extension. Imported here, once, before any Python registration (cnnkern/ops/).
# ----------------------------------------------------------------------------------------------
_C = None
_C_ERROR: str | None = None
try:
    from cnnkern import _C
except ImportError as exc:  # not built (no toolkit, CNNKERN_SKIP_CUDA_BUILD) or built for another torch
    _C = None
    here = os.path.dirname(os.path.abspath(__file__))
    built = [f for f in os.listdir(here) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if built:
        _C_ERROR = (
            f"cnnkern._C exists ({built[0]}) but failed to load: {exc}. It was probably built "
            "against another torch or Python; rebuild it: pip install --no-build-isolation --no-deps -e ."
        )
    else:
        _C_ERROR = (
            "cnnkern._C is not built (no CUDA toolkit was found at build time, or "
            "CNNKERN_SKIP_CUDA_BUILD was set). Build it with a CUDA toolkit: "
            "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation --no-deps -e ."
        )


def has_extension() -> bool:
    """True when ``cnnkern._C`` (the CUDA C++ kernels) is loaded."""
    return _C is not None


# Looked up once, at import: torch.compile traces resolve() and cannot trace importlib.
_TRITON_ERROR = (
    None if importlib.util.find_spec("triton") is not None else "Triton is not installed: pip install triton"
)


def interpreter_enabled() -> bool:
    """Whether cnnkern's Triton kernels run under Triton's CPU interpreter.

    Triton decides this when a kernel is *defined*, so once ``cnnkern.kernels`` is imported the
    answer is the one recorded at that import, whatever the environment says now.
    """
    kernels = sys.modules.get("cnnkern.kernels")
    if kernels is not None and hasattr(kernels, "INTERPRET"):
        return bool(kernels.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (default: this machine's GPU), or None."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    if name in ("torch", "auto"):
        return None
    if isinstance(device, torch.device):
        dev = device
    else:
        dev = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
    if name == "triton":
        if _TRITON_ERROR:
            return _TRITON_ERROR
        if dev.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is available to PyTorch"
        if dev.type == "cpu":
            if interpreter_enabled():
                return None
            return (
                "the Triton backend got CPU tensors, and Triton runs on the CPU only under its "
                "interpreter: set TRITON_INTERPRET=1 before importing cnnkern, move the tensors to "
                "a CUDA device, or use backend='torch'"
            )
        return f"the Triton backend does not support device type {dev.type!r}"
    # name == "cuda"
    if _C is None:
        return _C_ERROR
    if dev.type != "cuda":
        return (
            f"the CUDA C++ backend needs CUDA tensors, got device {str(dev)!r}; move the tensors to "
            "a CUDA device or use backend='torch' (or 'triton' under TRITON_INTERPRET=1)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available to PyTorch"
    return None


def available_backends() -> list[str]:
    """The concrete backends that can run on this machine (``"torch"`` always)."""
    out = ["torch"]
    if unavailable_reason("triton") is None:
        out.append("triton")
    if unavailable_reason("cuda") is None:
        out.append("cuda")
    return out


# ----------------------------------------------------------------------------------------------
# The current backend: CNNKERN_BACKEND, then set_backend(), then use_backend() (innermost wins).
# ----------------------------------------------------------------------------------------------
def _check_name(name, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what}: unknown backend {name!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    return name


_global_backend: str | None = None  # None: read CNNKERN_BACKEND (default "auto")
_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("cnnkern_backend", default=None)


def get_backend() -> str:
    """The backend used when an op is called with ``backend=None``."""
    scoped = _scoped_backend.get()
    if scoped is not None:
        return scoped
    if _global_backend is not None:
        return _global_backend
    return _check_name(os.environ.get(_ENV_VAR, "auto").strip() or "auto", f"environment variable {_ENV_VAR}")


def set_backend(name: str) -> None:
    """Set the process-wide default backend (overrides ``CNNKERN_BACKEND``)."""
    global _global_backend
    _global_backend = _check_name(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: ops called inside it with ``backend=None`` use ``name``."""
    token = _scoped_backend.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The concrete backend (``"triton" | "cuda" | "torch"``) that runs ``op`` on ``device``."""
    name = get_backend() if backend is None else _check_name(backend, f"{op}: backend")
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        for cand in AUTO_ORDER.get(op, GPU_BACKENDS):
            if unavailable_reason(cand, device) is None:
                return cand
        return "torch"
    if name in GPU_BACKENDS and name not in AUTO_ORDER.get(op, GPU_BACKENDS):
        have = ", ".join(repr(b) for b in (*AUTO_ORDER.get(op, ()), "torch"))
        raise BackendUnavailableError(f"{op}: backend {name!r} has no kernel for this op yet; it has: {have}")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable: {reason}")
    return name
