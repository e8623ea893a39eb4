"""Test harness: Triton's interpreter on machines without a GPU, NaN-poisoned outputs, the `gpu`
marker, and the shared fixtures. The helpers themselves live in tests/helpers.py."""

import os

# Both must be in the environment before cnnkern (and so its Triton kernels) is imported:
# Triton decides interpreter-or-GPU when a kernel is defined, and cnnkern reads CNNKERN_POISON
# when its ops module is imported.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CNNKERN_POISON", "1")

import pytest

HAS_CUDA = torch.cuda.is_available()

# CNNKERN_EMULATE_CUDA=1 (on a machine without a GPU): the "cuda" backend runs the CUDA C++ kernels
# on CPU tensors through the emulator of tests/cuda_emulator.py, so every test parametrized over
# backends also checks the CUDA kernels. `scripts/dev test` runs the backend tests once more this way.
EMULATE_CUDA = not HAS_CUDA and os.environ.get("CNNKERN_EMULATE_CUDA", "0") not in ("", "0")
if EMULATE_CUDA:
    import cuda_emulator

    cuda_emulator.install()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_validate.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not (EMULATE_CUDA and "emulated" in item.keywords):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_backend_state():
    """Every test starts from the default backend ("auto", or CNNKERN_BACKEND) and a fixed seed."""
    import cnnkern._backend as b

    saved = b._global_backend
    b._global_backend = None
    torch.manual_seed(0)
    yield
    b._global_backend = saved


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
