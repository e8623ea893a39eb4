"""Build script for cnnkern.

The Triton kernels (``kernels/``) are pure Python and are installed as ``cnnkern.kernels``.
The CUDA C++ kernels (``csrc/``) are compiled into the extension ``cnnkern._C`` whenever a CUDA
toolkit is found, also on machines without a GPU, for sm_80 and sm_90a plus sm_90 PTX. The host
side of warm calls (``csrc/host/``) is compiled into ``cnnkern._host`` with torch's C++ API alone.

Build without build isolation, after torch is installed (otherwise pip downloads a second torch
into the isolated build environment)::

    pip install --no-build-isolation --no-deps -e .

Environment:
    CNNKERN_SKIP_CUDA_BUILD=1   build no extension (neither _C, so no "cuda" backend, nor _host)
    CUDA_HOME                   the toolkit; when unset, /usr/local/cuda is used if it exists
    MAX_JOBS                    parallel nvcc jobs (ninja); defaults to the number of cores
    CNNKERN_NVCC_THREADS        nvcc --threads (each file's GPU targets in parallel; 0: one per target)
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch.utils.cpp_extension reads CUDA_HOME when it is imported. Left unset, it finds nvcc at
# /usr/local/bin/nvcc and guesses CUDA_HOME=/usr/local, which has no lib64/libcudart: set it first.
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _say(msg):
    print(f"cnnkern setup: {msg}", file=sys.stderr, flush=True)


def _find_nvcc():
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


# sm_80 (A100) and sm_90a (H100/H200: sm_90 with the arch-specific wgmma) machine code, plus
# sm_90 PTX for later GPUs to JIT (without the wgmma kernels: csrc/cuda/conv2d_wgmma.cu).
# CNNKERN_SM90A tells the host code that the sm_90a kernels are in the binary.
NVCC_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
    "-DCNNKERN_SM90A=1",
]


def _nvcc_threads():
    # nvcc compiles a file's three targets one after another unless told to use threads: on a
    # many-core machine (the GPU machine's build, scripts/gpu_validate.sh) that file's wall time
    # bounds the build.
    n = os.environ.get("CNNKERN_NVCC_THREADS", "").strip()
    if not n:
        return []
    if not n.isdigit():
        raise SystemExit(f"CNNKERN_NVCC_THREADS must be a number of threads (0: as many as targets), got {n!r}")
    return [f"--threads={n}"]


def _extensions():
    if os.environ.get("CNNKERN_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        _say(
            "CNNKERN_SKIP_CUDA_BUILD is set: not compiling cnnkern._C or cnnkern._host (ones already "
            "built in place, cnnkern/_C*.so and cnnkern/_host*.so, are still used; without _C the "
            "'cuda' backend is unavailable, without _host warm calls run their host work in Python)."
        )
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say(
            "torch is not installed in the build environment: building no extension "
            "(install torch first and build with --no-build-isolation)."
        )
        return [], {}
    # the host side of warm calls (csrc/host/): torch's C++ API only, built with or without CUDA
    host = CppExtension(
        name="cnnkern._host",
        sources=sorted(glob.glob("csrc/host/*.cpp")),
        extra_compile_args={"cxx": ["-O2", "-std=c++20"]},
        py_limited_api=False,
    )
    build = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    if _find_nvcc() is None:
        _say(
            "no CUDA toolkit found (no nvcc in CUDA_HOME or on PATH): building no CUDA extension; "
            "the 'cuda' backend will be unavailable."
        )
        return [host], build

    sources = ["csrc/cnnkern.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
    ext = CUDAExtension(
        name="cnnkern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", *NVCC_ARCH_FLAGS, *_nvcc_threads()],
        },
        py_limited_api=False,
    )
    return [host, ext], build


ext_modules, cmdclass = _extensions()

setup(
    name="cnnkern",
    version="0.1.0",
    description="Triton and CUDA C++ kernels for the layers of classic CNNs (AlexNet, VGG, GoogLeNet, ResNet)",
    python_requires=">=3.10",
    packages=["cnnkern", "cnnkern.ops", "cnnkern.models", "cnnkern.kernels", "cnnkern.benchmarks"],
    package_dir={"cnnkern.kernels": "kernels", "cnnkern.benchmarks": "benchmarks"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.11", "triton>=3.6"],
    extras_require={"dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "tqdm"]},
    entry_points={"console_scripts": ["cnnkern=cnnkern.cli:main"]},
    zip_safe=False,
)
