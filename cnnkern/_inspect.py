"""Static inspection of the compiled CUDA kernels in ``cnnkern._C``, without a GPU.

``cuobjdump`` lists the machine code (cubin) and PTX embedded in the extension and the resources
ptxas gave each kernel (registers, shared memory, stack frame, local memory = spills). It comes
with the CUDA toolkit, and also inside Triton's wheel, which every cnnkern environment has.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from . import _backend


def cuobjdump() -> str | None:
    """Path of a cuobjdump binary: CUDA_HOME's, then PATH's, then the one Triton ships."""
    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    cands = [os.path.join(home, "bin", "cuobjdump")] if home else []
    found = shutil.which("cuobjdump")
    if found:
        cands.append(found)
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def extension_path() -> str | None:
    """File of the loaded ``cnnkern._C``, or None when it is not loaded."""
    return getattr(_backend._C, "__file__", None)


def _run(flag: str, path: str) -> str:
    tool = cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA_HOME/bin, PATH, or Triton's backends/nvidia/bin)")
    return subprocess.run([tool, flag, path], check=True, capture_output=True, text=True).stdout


def embedded_code(path: str) -> dict[str, list[str]]:
    """``{"elf": ["sm_80", ...], "ptx": ["sm_90", ...]}``: the architectures compiled into ``path``."""
    out = {}
    for kind in ("elf", "ptx"):
        text = _run(f"--list-{kind}", path)
        out[kind] = sorted(set(re.findall(r"\.(sm_\d+a?)\.(?:cubin|ptx)", text)))
    return out


@dataclass
class KernelResources:
    arch: str
    name: str  # mangled
    registers: int
    stack: int
    shared: int
    local: int  # bytes of local memory per thread: register spills (and local arrays)


def resource_usage(path: str) -> list[KernelResources]:
    """ptxas resource usage of every kernel in ``path``, per architecture."""
    rows, arch = [], "?"
    lines = _run("--dump-resource-usage", path).splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m and i + 1 < len(lines):
            fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", lines[i + 1]))
            rows.append(KernelResources(arch, m.group(1), int(fields.get("REG", 0)), int(fields.get("STACK", 0)),
                                        int(fields.get("SHARED", 0)), int(fields.get("LOCAL", 0))))
    return rows
