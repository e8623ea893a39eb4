"""Build cnnkern's CUDA C++ kernels for the CPU emulator (tests/cuemu/) and load them.

The sources in csrc/ are used as they are, after a few mechanical rewrites that only change how
CUDA syntax is spelled, never what a kernel computes:

- ``kernel<<<grid, block, smem, stream>>>(args);`` becomes ``::cuemu::launch(kernel, grid, block,
  smem, stream, args);``;
- ``extern __shared__ [__align__(n)] T name[];`` becomes a pointer to the block's dynamic shared
  memory;
- ``__shared__ T a[..], b[..];`` (static shared memory) becomes function statics, each followed by
  ``::cuemu::static_smem(a, sizeof(a));``, which poisons it at the first thread of each block to
  reach it (as the dynamic shared memory is), so a block never sees the previous block's values;
- the includes of the CUDA runtime, cuda_fp16/cuda_bf16 and c10/cuda become ``cuemu.h``, and
  ``ptx.cuh`` (the only inline PTX) becomes ``cuemu_ptx.h``;
- ``TORCH_LIBRARY_IMPL(cnnkern, CUDA, m)`` becomes ``TORCH_LIBRARY_IMPL(cnnkern_emu, CPU, m)`` and
  the schemas of csrc/cnnkern.cpp are defined again under ``cnnkern_emu``, so the emulated ops
  (``torch.ops.cnnkern_emu.conv2d_forward_cuda`` and the rest) take CPU tensors and never mix
  with the real extension;
- ``.is_cuda()`` checks become ``.is_cpu()`` (the emulated device is the CPU).

Anything else that is CUDA-only makes the compile fail, loudly: the emulator does not guess.

Usage: ``load()`` builds once (ninja; cached under build/cuemu) and returns ``torch.ops.cnnkern_emu``.
``python tests/cuda_emulator.py`` only writes the rewritten sources (to read what is compiled).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = Path(__file__).resolve().parent / "cuemu"
BUILD = ROOT / "build" / "cuemu"

_CUDA_INCLUDE = re.compile(r"#include\s*<(cuda_runtime\.h|cuda_fp16\.h|cuda_bf16\.h|c10/cuda/[\w/]+\.h)>")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*)\s+(\w+)\s*\[\]\s*;")
# (at the start of a line, so that comments that name __shared__ are left alone)
_STATIC_SHARED = re.compile(r"(?m)^([ \t]*)__shared__\s+((?:__align__\(\d+\)\s+)?[\w:]+(?:\s*<[^<>;]*>)?)\s+([^;]+);")
# the kernel expression right before <<<: a (qualified) name with optional, non-nested template
# arguments
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:\s*<[^<>;()]*>)?)\s*<<<")


def _split_top(s: str) -> list[str]:
    """Split a comma-separated argument list at depth 0 (parentheses, brackets, braces, angles are
    not tracked: the launch configurations here hold no template commas)."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _rewrite_launches(src: str, name: str) -> str:
    out, pos = [], 0
    for m in _LAUNCH.finditer(src):
        if m.start() < pos:
            continue
        cfg_end = src.index(">>>", m.end())
        cfg = _split_top(src[m.end() : cfg_end])
        if not 2 <= len(cfg) <= 4:
            raise ValueError(f"{name}: a launch configuration of {len(cfg)} parts: {src[m.start() : cfg_end + 3]}")
        cfg += ["0", "nullptr"][len(cfg) - 2 :]
        i = cfg_end + 3
        while src[i].isspace():
            i += 1
        if src[i] != "(":
            raise ValueError(f"{name}: a launch without arguments after >>>")
        depth, j = 0, i
        while True:
            if src[j] == "(":
                depth += 1
            elif src[j] == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        args = src[i + 1 : j].strip()
        call = f"::cuemu::launch({m.group(1)}, {', '.join(cfg)}{', ' + args if args else ''})"
        out.append(src[pos : m.start()])
        out.append(call)
        pos = j + 1
    out.append(src[pos:])
    return "".join(out)


def _static_shared(m: re.Match) -> str:
    names = []
    for d in _split_top(m.group(3)):
        n = re.match(r"(\w+)\s*(\[[^\]]+\]\s*)+$", d)
        if n is None:
            raise ValueError(f"static shared memory that is not an array of fixed size: {m.group(0)}")
        names.append(n.group(1))
    return f"{m.group(1)}static {m.group(2)} {m.group(3)};" + "".join(
        f" ::cuemu::static_smem({n}, sizeof({n}));" for n in names
    )


def rewrite(src: str, name: str) -> str:
    """The emulator's spelling of one csrc file (see the module docstring)."""
    s = _CUDA_INCLUDE.sub('#include "cuemu.h"', src)
    s = s.replace('#include "ptx.cuh"', '#include "cuemu_ptx.h"')
    s = _EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::cuemu::dynamic_smem());", s
    )
    s = _STATIC_SHARED.sub(_static_shared, s)
    s = _rewrite_launches(s, name)
    s = re.sub(r"TORCH_LIBRARY_IMPL\(\s*cnnkern\s*,\s*CUDA\s*,", "TORCH_LIBRARY_IMPL(cnnkern_emu, CPU,", s)
    s = s.replace(".is_cuda()", ".is_cpu()")
    if "<<<" in s or re.search(r"(?m)^[^/\n]*\b__shared__\b", s) or re.search(r"\basm\s*(volatile\s*)?\(", s):
        raise ValueError(f"{name}: CUDA syntax the emulator does not rewrite is left")
    return s


def schemas() -> str:
    """csrc/cnnkern.cpp's TORCH_LIBRARY_FRAGMENT block, as the cnnkern_emu library."""
    src = (CSRC / "cnnkern.cpp").read_text()
    start = src.index("TORCH_LIBRARY_FRAGMENT(cnnkern, m)")
    i = src.index("{", start)
    depth, j = 0, i
    while True:
        depth += {"{": 1, "}": -1}.get(src[j], 0)
        if depth == 0:
            break
        j += 1
    return "#include <torch/library.h>\n\nTORCH_LIBRARY(cnnkern_emu, m) " + src[i : j + 1] + "\n"


def write_sources(dest: Path = BUILD / "src") -> list[Path]:
    """Write the rewritten sources (only files whose text changed, so ninja rebuilds only those)."""
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {"schemas.cpp": schemas()}
    headers = sorted((CSRC / "cuda").glob("*.h")) + [
        p for p in sorted((CSRC / "cuda").glob("*.cuh")) if p.name != "ptx.cuh"
    ]  # ptx.cuh: cuemu_ptx.h instead
    for p in [CSRC / "common.h", *headers]:
        files[p.name] = rewrite(p.read_text(), p.name)
    for p in sorted((CSRC / "cuda").glob("*.cu")):
        files[p.stem + ".cpp"] = rewrite(p.read_text(), p.name)
    for p in [*EMU.glob("*.h"), *EMU.glob("*.cpp")]:
        files[p.name] = p.read_text()
    for p in sorted(EMU.glob("*.cu")):  # the emulator's own test kernels (tests/test_cuemu.py)
        files[p.stem + ".cpp"] = rewrite(p.read_text(), p.name)
    for fname, text in files.items():
        target = dest / fname
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    return [dest / f for f in files if f.endswith(".cpp")]


_OPS = None


def load(verbose: bool = False):
    """Build (cached) and load the emulated kernels; returns torch.ops.cnnkern_emu."""
    global _OPS
    if _OPS is not None:
        return _OPS
    import torch
    from torch.utils import cpp_extension

    # test workers (pytest-xdist) may build at the same time: one at a time writes the sources and
    # runs ninja, the others then find the build up to date
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _load_locked(torch, cpp_extension, verbose)


def _load_locked(torch, cpp_extension, verbose):
    global _OPS
    sources = write_sources()
    # CUEMU_ASAN=1: AddressSanitizer build (out-of-bounds reads and writes of the kernels in the
    # tensors' memory); the process must start with the ASan runtime (and libstdc++, so that ASan
    # finds __cxa_throw) preloaded: `CUEMU_ASAN=1 scripts/dev test-emulated` does that.
    asan = os.environ.get("CUEMU_ASAN", "0") not in ("", "0")
    # one object folder per Python and torch (a second virtual environment on another stack,
    # requirements-device.txt, must not rebuild this one's objects, nor load them)
    stack = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.split('+')[0]}"
    build = BUILD / (("obj-asan-" if asan else "obj-") + stack)
    build.mkdir(parents=True, exist_ok=True)
    flags = ["-O2", "-Wno-unknown-pragmas"] + (["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else [])
    cpp_extension.load(
        name="cnnkern_emu_asan" if asan else "cnnkern_emu",
        sources=[str(s) for s in sources],
        extra_cflags=flags,
        extra_ldflags=["-fsanitize=address"] if asan else [],
        extra_include_paths=[str(BUILD / "src")],
        build_directory=str(build),
        is_python_module=False,
        verbose=verbose,
    )
    _OPS = torch.ops.cnnkern_emu
    return _OPS


def install():
    """Emulated-CUDA test mode: backend "cuda" runs on CPU tensors through the emulator.

    cnnkern's op files reach the CUDA ops through ``cnnkern.ops._common.cuda_ops()``; this puts
    the emulator's namespace there, and makes ``cnnkern._backend.unavailable_reason`` report the
    "cuda" backend available for CPU tensors. Everything above the raw ops (validation, layouts,
    autograd, BatchNorm bookkeeping) is cnnkern's own code, unchanged. For tests only: the
    conftest calls it when CNNKERN_EMULATE_CUDA=1.
    """
    import torch

    from cnnkern import _backend
    from cnnkern.ops import _common

    _common._CUDA_OPS = load()
    real = _backend.unavailable_reason
    if getattr(real, "emulated", False):
        return

    def unavailable_reason(name, device=None):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if name == "cuda" and dev.type == "cpu":
            return None
        return real(name, device)

    unavailable_reason.emulated = True
    _backend.unavailable_reason = unavailable_reason


def available() -> str | None:
    """None when the emulator can be built here, else why not."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "no ninja"
    return None


if __name__ == "__main__":
    for p in write_sources(Path(sys.argv[1]) if len(sys.argv) > 1 else BUILD / "src"):
        print(p)
