"""Checks, under the stand-in driver, that a warm forward of each network, and a warm training
step, do nothing that a CUDA graph capture forbids, as far as a machine without a GPU can tell.

Run by tests/test_host_cost.py in a child process that benchmarks/bench_host.py prepares, on the
Triton backend and on the CUDA C++ ops' stand-in kernels. After two warm-up calls (compilation,
autotuning, plans made) each network runs once more, twice over:

* under a dispatch mode (the full route, every op visible) that flags any operation that reads
  a tensor on the host (``item``, ``nonzero``, ``equal``, ``is_nonzero``, ...): on a GPU each
  would synchronise with the device, which a capture forbids;
* plainly (plans replayed), while ``torch.cuda.synchronize`` and the stand-in driver count
  synchronisations and module loads (a kernel compiled or loaded inside a capture).

What it cannot see: device-to-host copies (the tensors are CPU tensors) and the CUDA caching
allocator's behaviour under a capture (the GPU tests, tests/test_cuda_graphs.py, capture the
networks for real). Prints one line per network and mode and exits non-zero on a finding.
"""

from __future__ import annotations

import sys

from benchmarks import bench_host

# aten operations that read a tensor's values on the host
HOST_READS = (
    "_local_scalar_dense",
    "item",
    "nonzero",
    "is_nonzero",
    "equal",
    "allclose",
    "masked_select",
    "_assert_async",
    "unique",
    "_unique2",
    "bincount",
    "repeat_interleave",
)


def networks() -> dict:
    """{name: (factory, input size)}: a network of each family, the smallest input each takes or
    a small one (also the GPU capture tests' list, tests/test_cuda_graphs.py)."""
    from cnnkern import models

    return {
        "resnet18": (lambda: models.resnet18(), 64),
        "resnet50 option A": (lambda: models.resnet50(shortcut="A"), 64),
        "alexnet (paper)": (lambda: models.alexnet(variant="paper"), 224),
        "vgg11-bn": (lambda: models.vgg11(batch_norm=True), 64),
        "googlenet (paper)": (lambda: models.googlenet(variant="paper"), 64),
        "cifar resnet20": (lambda: models.cifar_resnet(20), 32),
    }


def main() -> int:
    lib = bench_host._install_stand_in()
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import cnnkern

    bench_host._accept_cpu_tensors()
    bench_host._untimed_autotuning()
    torch.manual_seed(0)
    syncs = []
    torch.cuda.synchronize = lambda *a, **k: syncs.append(a)

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in HOST_READS:
                self.found.append(str(func))
            return func(*args, **(kwargs or {}))

    with HostReads() as mode:  # the check itself: a host read is seen
        float(torch.ones(2).sum())
    if not mode.found:
        print("FOUND: the dispatch mode does not see a host read")
        return 1
    bf, cl = torch.bfloat16, torch.channels_last
    nets = networks()
    bad = 0
    for backend in ("triton", "cuda"):
        if backend == "cuda" and not cnnkern._backend.has_extension():
            continue
        for name, (make, size) in nets.items():
            model = make().to(bf, memory_format=cl)
            x = torch.randn(2, 3, size, size, dtype=bf).to(memory_format=cl)
            steps = {"eval forward": lambda model=model, x=x: model.eval()(x)}
            if name in ("resnet18", "cifar resnet20"):

                def train_step(model=model, x=x):
                    model.train()
                    loss = model(x).float().sum()
                    loss.backward()

                steps["training step"] = train_step
            for what, step in steps.items():
                with torch.no_grad() if what == "eval forward" else torch.enable_grad(), cnnkern.use_backend(backend):
                    for _ in range(2):
                        step()
                    with HostReads() as mode:
                        step()
                    loads, n_syncs = lib.cnnkern_stub_loads(), len(syncs)
                    step()
                    loads, n_syncs = lib.cnnkern_stub_loads() - loads, len(syncs) - n_syncs
                findings = [f"host reads {sorted(set(mode.found))}"] if mode.found else []
                findings += [f"{loads} module loads"] if loads else []
                findings += [f"{n_syncs} synchronisations"] if n_syncs else []
                bad += bool(findings)
                print(
                    f"{'ok' if not findings else 'FOUND'}: {name}, {what} [{backend}]"
                    + (": " + "; ".join(findings) if findings else "")
                )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
