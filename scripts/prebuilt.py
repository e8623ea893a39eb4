"""An extension built on the development machine for the GPU machine: its key, written and checked.

Compiling cnnkern._C on the GPU machine costs part of its fixed, short time budget. The
development machine can build the same binary in a second environment on the GPU machine's
stack (requirements-device.txt: Python 3.12, torch 2.11.0+cu130; `scripts/dev
device-setup`) and send the .so and its key along with the working tree.
scripts/gpu_validate.sh uses it instead of compiling when this script's check passes:

    python scripts/prebuilt.py write   # after a build: the key of cnnkern/_C<suffix>.so and
                                       # cnnkern/_host<suffix>.so, beside the first
    python scripts/prebuilt.py check   # exit 0: that extension was built from these sources, for
                                       # this Python, torch and processor, and it loads; else 1

The key holds the SHA-256 of setup.py and of every file under csrc/ (the sources and the build
flags), the Python version, torch's version (which names its CUDA build), the processor, and the
SHA-256 of the .so itself, so that a stale, rebuilt or truncated binary fails the check and is
compiled again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


NAMES = ("_C", "_host")  # the CUDA C++ kernels, the host side of warm calls: one build makes both


def extension_path(root: str = ROOT, name: str = "_C") -> str:
    """cnnkern/<name> with this interpreter's extension suffix (e.g. .cpython-312-x86_64-linux-gnu.so)."""
    return os.path.join(root, "cnnkern", name + sysconfig.get_config_var("EXT_SUFFIX"))


def key_path(root: str = ROOT) -> str:
    return extension_path(root) + ".key.json"


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # Python 3.11+ (both stacks)


def source_hash(root: str = ROOT) -> str:
    """One SHA-256 over setup.py and every file under csrc/, each with its path relative to root."""
    files = [os.path.join(root, "setup.py")]
    for base, dirs, names in os.walk(os.path.join(root, "csrc")):
        dirs.sort()
        files += [os.path.join(base, n) for n in sorted(names)]
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.relpath(path, root).encode() + b"\0")
        h.update(_sha256_file(path).encode() + b"\0")
    return h.hexdigest()


def current_key(root: str = ROOT) -> dict:
    """The key an extension built here, now, from this tree would have (the .so's hash included)."""
    import torch

    return {
        "sources": source_hash(root),
        "python": "%d.%d" % sys.version_info[:2],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "extension": _sha256_file(extension_path(root)),
        "host": _sha256_file(extension_path(root, "_host")),
    }


def write(root: str = ROOT) -> dict:
    for name in NAMES:
        so = extension_path(root, name)
        if not os.path.exists(so):
            raise SystemExit(f"prebuilt: no extension to describe: {so} does not exist (build it first)")
    key = current_key(root)
    with open(key_path(root), "w") as f:
        json.dump(key, f, indent=1, sort_keys=True)
        f.write("\n")
    print(
        f"prebuilt: {os.path.relpath(key_path(root), root)} written (torch {key['torch']}, "
        f"Python {key['python']}, sources {key['sources'][:12]})"
    )
    return key


def check(root: str = ROOT) -> tuple[bool, str]:
    """(usable, why): whether the extensions in place match their key here and load."""
    so, kp = extension_path(root), key_path(root)
    for name in NAMES:
        path = extension_path(root, name)
        if not os.path.exists(path) or not os.path.exists(kp):
            return False, f"no prebuilt extension ({os.path.relpath(path, root)} with its key)"
    try:
        with open(kp) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as exc:
        return False, f"unreadable key {kp}: {exc}"
    here = current_key(root)
    diff = [f"{k}: built {recorded.get(k)!r}, here {v!r}" for k, v in here.items() if recorded.get(k) != v]
    if diff:
        return False, "prebuilt extension does not match: " + "; ".join(diff)
    # load the binary alone (the package's Triton half may not be importable before the install
    # step): its symbols resolve against this torch and its operators register
    import importlib.util

    for name in NAMES:
        try:
            spec = importlib.util.spec_from_file_location(f"cnnkern.{name}", extension_path(root, name))
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except ImportError as exc:
            return False, f"prebuilt extension does not load: {exc}"
    return True, f"prebuilt extension {os.path.relpath(so, root)} matches this tree and machine and loads"


def main(argv: list[str]) -> int:
    if argv == ["write"]:
        write()
        return 0
    if argv == ["check"]:
        ok, why = check()
        print(f"prebuilt: {why}")
        return 0 if ok else 1
    print("usage: python scripts/prebuilt.py write|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
