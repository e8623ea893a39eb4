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
from dataclasses import dataclass, field

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
    # read from the resource-usage dump's "Fatbin elf|ptx code:" headers and their "arch = sm_NN"
    # lines, which name arch-specific code (sm_90a) in every cuobjdump release; --list-elf's file
    # names do not in 12.8 (Triton 3.6 ships that one: it lists sm_90a cubins as .sm_90.cubin)
    out = {"elf": set(), "ptx": set()}
    kind = None
    for line in _run("--dump-resource-usage", path).splitlines():
        m = re.match(r"Fatbin (elf|ptx) code:", line)
        if m:
            kind = m.group(1)
            continue
        m = re.match(r"\s*arch = (sm_\d+a?)\s*$", line)
        if m and kind:
            out[kind].add(m.group(1))
            kind = None
    return {k: sorted(v) for k, v in out.items()}


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
            rows.append(
                KernelResources(
                    arch,
                    m.group(1),
                    int(fields.get("REG", 0)),
                    int(fields.get("STACK", 0)),
                    int(fields.get("SHARED", 0)),
                    int(fields.get("LOCAL", 0)),
                )
            )
    return rows


def sass_opcodes(
    path: str, arch: str, prefixes=("HMMA", "HGMMA", "LDSM", "LDGSTS", "WARPGROUP", "FENCE")
) -> dict[str, dict[str, int]]:
    """Per kernel (mangled name) in ``path``'s ``arch`` machine code, how many instructions start
    with each of ``prefixes`` (full opcode with modifiers as the key, e.g. ``HMMA.16816.F32.BF16``):
    tensor-core MMAs (HMMA: mma.sync, HGMMA: wgmma), ldmatrix (LDSM), cp.async (LDGSTS), the
    wgmma fences and waits (WARPGROUP.ARRIVE, WARPGROUP.DEPBAR) and proxy fences (FENCE)."""
    tool = cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA_HOME/bin, PATH, or Triton's backends/nvidia/bin)")
    sass = subprocess.run([tool, "-sass", "-arch", arch, path], check=True, capture_output=True, text=True).stdout
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = {}
            continue
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)", line)  # HGMMA.64x128x16.F32
        if name is not None and m and m.group(1).startswith(prefixes):
            out[name][m.group(1)] = out[name].get(m.group(1), 0) + 1
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernels, compiled ahead of time for a GPU architecture on a machine without a GPU
# ---------------------------------------------------------------------------------------------
@dataclass
class TritonSpec:
    """One Triton kernel specialised the way a real call specialises it.

    ``ones`` are integer arguments equal to 1 at run time (Triton specialises those: unit strides
    of channels_last tensors), ``div16`` the ones divisible by 16 (every pointer is assumed
    16-byte aligned, as PyTorch's allocator gives). ``gate``: a main kernel, which must use the
    architecture's tensor-core instructions (wgmma on sm_90, mma on sm_80) with no spills.
    """

    label: str
    module: str
    kernel: str
    dtype: str
    constexprs: dict
    ones: tuple = ()
    div16: tuple = ()
    configs: list | None = None  # [(kwargs, num_warps, num_stages)]; None: the autotuner's
    gate: bool = False
    floats: tuple = ()  # fp32 scalar arguments (everything else not a pointer is i32)
    ptr_dtypes: dict = field(default_factory=dict)  # pointers whose element type is not ``dtype``


def _conv_specs():
    import triton.language as tl

    strides16 = ("sxn", "sxh", "sxw", "swk", "swr", "sws", "syn", "syp", "syq", "Cg", "Kg")
    fwd = dict(
        R=3,
        S=3,
        IS_CL_X=True,
        HAS_BIAS=True,
        HAS_RES=False,
        RELU=True,
        STATS=False,
        SPLIT=False,
        ACC=tl.float32,
        PREC="ieee",
    )
    ws = {"ws_ptr": "fp32"}
    dgrad = dict(R=3, S=3, IS_CL_X=True, SPLIT=False, ACC=tl.float32, PREC="ieee")
    dgrad16 = ("sgn", "sgp", "sgq", "swk", "swr", "sws", "sxn", "sxh", "sxw", "Cg", "Kg")
    return [
        TritonSpec(
            "conv2d forward 3x3, bf16 NHWC",
            "conv2d",
            "_fwd_kernel",
            "bf16",
            fwd,
            ones=("sxc", "swc", "syk"),
            div16=strides16,
            gate=True,
            ptr_dtypes=ws,
        ),
        TritonSpec(
            "conv2d forward 3x3 + BatchNorm statistics, bf16 NHWC",
            "conv2d",
            "_fwd_kernel",
            "bf16",
            {**fwd, "STATS": True, "RELU": False},
            ones=("sxc", "swc", "syk"),
            div16=strides16,
            gate=True,
            ptr_dtypes={**ws, "st_ptr": "fp32"},
        ),
        TritonSpec(
            "conv2d forward 3x3 split-K partials, bf16 NHWC",
            "conv2d",
            "_fwd_kernel",
            "bf16",
            {**fwd, "SPLIT": True},
            ones=("sxc", "swc", "syk"),
            div16=strides16,
            gate=True,
            ptr_dtypes=ws,
        ),
        TritonSpec(
            "conv2d forward 1x1 (GEMM), bf16 NHWC",
            "conv2d",
            "_fwd_1x1_kernel",
            "bf16",
            {**fwd, "R": 1, "S": 1},
            ones=("sxc", "swc", "syk", "swr", "sws", "sh", "sw"),
            div16=strides16,
            gate=True,
            ptr_dtypes=ws,
        ),
        TritonSpec(
            "conv2d forward 1x1 + residual + ReLU, bf16 NHWC",
            "conv2d",
            "_fwd_1x1_kernel",
            "bf16",
            {**fwd, "R": 1, "S": 1, "HAS_RES": True},
            ones=("sxc", "swc", "syk", "swr", "sws", "sh", "sw"),
            div16=strides16,
            gate=True,
            ptr_dtypes=ws,
        ),
        TritonSpec(
            "conv2d forward 7x7 C=3, bf16 NHWC",
            "conv2d",
            "_fwd_small_c_kernel",
            "bf16",
            {**fwd, "R": 7, "S": 7},
            ones=("sxc", "swc", "syk"),
            div16=("sxn", "syn", "syp", "syq", "Kg"),
            gate=True,
            ptr_dtypes=ws,
        ),
        TritonSpec(
            "conv2d forward split-K sum + residual + ReLU, bf16 NHWC",
            "conv2d",
            "_fwd_split_sum_kernel",
            "bf16",
            dict(HAS_BIAS=True, HAS_RES=True, RELU=True, STATS=False, ACC=tl.float32),
            ones=("syk",),
            ptr_dtypes={**ws, "st_ptr": "fp32"},
            configs=[({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 1)],
        ),
        TritonSpec(
            "conv2d forward split-K sum + BatchNorm statistics, bf16 NHWC",
            "conv2d",
            "_fwd_split_sum_kernel",
            "bf16",
            dict(HAS_BIAS=False, HAS_RES=False, RELU=False, STATS=True, ACC=tl.float32),
            ones=("syk",),
            ptr_dtypes={**ws, "st_ptr": "fp32"},
            configs=[({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 1)],
        ),
        TritonSpec(
            "conv2d dgrad 3x3, bf16 NHWC",
            "conv2d",
            "_dgrad_kernel",
            "bf16",
            dgrad,
            ones=("sgk", "swc", "sxc"),
            div16=dgrad16,
            ptr_dtypes=ws,
        ),
        TritonSpec(
            "conv2d dgrad 3x3 split-K partials, bf16 NHWC",
            "conv2d",
            "_dgrad_kernel",
            "bf16",
            {**dgrad, "SPLIT": True},
            ones=("sgk", "swc", "sxc"),
            div16=dgrad16,
            ptr_dtypes=ws,
        ),
        TritonSpec(
            "conv2d wgrad 3x3, bf16 NHWC",
            "conv2d",
            "_wgrad_kernel",
            "bf16",
            dict(R=3, S=3, WITH_BIAS=True, ACC=tl.float32, PREC="ieee"),
            ones=("sgk", "sxc"),
            div16=("sgn", "sgp", "sgq", "sxn", "sxh", "sxw", "Cg", "Kg", "K"),
            configs=[({"BLOCK_K": 64, "BLOCK_C": 64, "BLOCK_M": 64}, 4, 3)],
        ),
        TritonSpec(
            "residual_add flat, bf16",
            "residual_add",
            "_flat_kernel",
            "bf16",
            dict(RELU_GRAD=False, RELU=True, ACC=tl.float32, INT64=False),
            div16=("numel",),
            configs=[({"BLOCK": 4096}, 8, 1)],
        ),
    ]


def _lrn_specs():
    import triton.language as tl

    scalars = ("k_hi", "k_lo", "an_hi", "an_lo", "nb_hi", "nb_lo", "nb1_hi", "nb1_lo", "cf_hi", "cf_lo")
    # NCHW, fp32 accumulation; BLOCK/num_warps as kernels/local_response_norm.py's _block picks them
    return [
        TritonSpec(
            "local_response_norm forward, bf16 NCHW",
            "local_response_norm",
            "_fwd_kernel",
            "bf16",
            dict(X_FLAT=True, ACC=tl.float32),
            floats=scalars,
            configs=[({"BLOCK": 512}, 4, 1)],
        ),
        TritonSpec(
            "local_response_norm backward, bf16 NCHW",
            "local_response_norm",
            "_bwd_kernel",
            "bf16",
            dict(X_FLAT=True, G_FLAT=True, ACC=tl.float32),
            floats=scalars,
            configs=[({"BLOCK": 256}, 4, 1)],
        ),
    ]


def _bn_specs():
    # the training-mode BatchNorm kernels around the convolution (kernels/conv_bn_relu.py and the
    # conv's split-K sum): bf16 activations and parameters, fp32 statistics, as a bf16 model runs
    import triton.language as tl

    bf16 = "bf16"
    elementwise = [({"BLOCK": 2048}, 8, 1)]
    small = [({"BLOCK_R": 32, "BLOCK_K": 64}, 4, 1)]
    return [
        TritonSpec(
            "conv_bn_relu finalize, fp32 stats, bf16 params",
            "conv_bn_relu",
            "_finalize_kernel",
            "fp32",
            dict(HAS_GAMMA=True, HAS_BETA=True, ACC=tl.float32),
            floats=("eps",),
            ptr_dtypes={"gamma_ptr": bf16, "beta_ptr": bf16},
            configs=small,
        ),
        TritonSpec(
            "conv_bn_relu finalize, fp64",
            "conv_bn_relu",
            "_finalize_kernel",
            "fp64",
            dict(HAS_GAMMA=True, HAS_BETA=False, ACC=tl.float64),
            floats=("eps",),
            configs=small,
        ),
        TritonSpec(
            "conv_bn_relu apply + ReLU, bf16 NHWC",
            "conv_bn_relu",
            "_apply_kernel",
            bf16,
            dict(CHANNELS_LAST=True, RELU=True, ACC=tl.float32),
            ptr_dtypes={"scale_ptr": "fp32", "shift_ptr": "fp32"},
            configs=elementwise,
        ),
        TritonSpec(
            "conv_bn_relu backward reductions, bf16 NHWC",
            "conv_bn_relu",
            "_reduce_kernel",
            bf16,
            dict(CHANNELS_LAST=True, RELU=True, ACC=tl.float32),
            ptr_dtypes={"part_ptr": "fp32"},
            configs=[({"BLOCK_R": 64, "BLOCK_K": 32}, 4, 1)],
        ),
        TritonSpec(
            "conv_bn_relu backward coefficients, bf16 params",
            "conv_bn_relu",
            "_coefficients_kernel",
            "fp32",
            dict(HAS_GAMMA=True, ACC=tl.float32),
            ptr_dtypes={"gamma_ptr": bf16, "sg_ptr": bf16, "sgx_ptr": bf16},
            configs=small,
        ),
        TritonSpec(
            "conv_bn_relu backward dy, bf16 NHWC",
            "conv_bn_relu",
            "_dy_kernel",
            bf16,
            dict(CHANNELS_LAST=True, RELU=True, ACC=tl.float32),
            ptr_dtypes={"a_ptr": "fp32", "b_ptr": "fp32", "c_ptr": "fp32"},
            configs=elementwise,
        ),
        TritonSpec(
            "conv2d wgrad split-K sum, bf16 weight",
            "conv2d",
            "_split_sum_kernel",
            bf16,
            dict(WITH_BIAS=True, ACC=tl.float32),
            ones=("s1",),
            ptr_dtypes={"ws_ptr": "fp32"},
            configs=[({"BLOCK": 1024}, 4, 1)],
        ),
    ]


def triton_specs() -> list[TritonSpec]:
    return _conv_specs() + _lrn_specs() + _bn_specs()


def variant_specs() -> list[TritonSpec]:
    """The autotuned convolution kernels of :func:`triton_specs` (checked there in bf16 NHWC, the
    fast path) in the other dtypes and layouts they run: fp16, fp32 as TF32 and as full fp32, fp64
    (fp64 accumulation and split-K partials) in NHWC, and bf16 and TF32 in NCHW (channel strides
    unknown: no divisibility hints). For ``cnnkern inspect --variants``: their spills are
    reported, not errors (these paths are correct, not tuned); a kept configuration whose shared
    memory exceeds the architecture's is an error, since it could not launch."""
    import dataclasses

    import triton.language as tl

    variants = [
        ("fp16", "fp16", {"PREC": "ieee"}, True),
        ("fp32 TF32", "fp32", {"PREC": "tf32"}, True),
        ("fp32", "fp32", {"PREC": "ieee"}, True),
        ("fp64", "fp64", {"ACC": tl.float64, "PREC": "ieee"}, True),
        ("bf16", "bf16", {}, False),
        ("fp32 TF32", "fp32", {"PREC": "tf32"}, False),
    ]
    out = []
    for s in _conv_specs():
        if s.configs is not None or "bf16 NHWC" not in s.label:
            continue
        for name, dtype, constexprs, channels_last in variants:
            const = {**s.constexprs, **constexprs}
            if "IS_CL_X" in const:
                const["IS_CL_X"] = channels_last
            ptr = {k: ("fp64" if dtype == "fp64" and k == "ws_ptr" else v) for k, v in s.ptr_dtypes.items()}
            out.append(
                dataclasses.replace(
                    s,
                    label=s.label.replace("bf16 NHWC", f"{name} {'NHWC' if channels_last else 'NCHW'}"),
                    dtype=dtype,
                    constexprs=const,
                    ones=s.ones if channels_last else (),
                    div16=s.div16 if channels_last else (),
                    ptr_dtypes=ptr,
                    gate=s.gate and (dtype in ("fp16", "bf16") or const.get("PREC") == "tf32"),
                )
            )
    return out


_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
# opt-in shared memory per block (bytes): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB
_SMEM_OPTIN = {80: 166912, 90: 232448}


def _triton_fn(spec: TritonSpec, arch: int):
    import importlib

    mod = importlib.import_module(f"cnnkern.kernels.{spec.module}")
    obj = getattr(mod, spec.kernel)
    configs = spec.configs
    if configs is None:  # an Autotuner: the configurations it would time on sm_<arch> for this call
        pruned = obj.configs
        if hasattr(mod, "gpu_configs"):
            pruned = mod.gpu_configs(
                pruned,
                kernel=spec.kernel,
                arch=arch,
                elem_bytes=_BYTES[spec.dtype],
                smem_limit=_SMEM_OPTIN.get(arch),
                **spec.constexprs,
            )
        configs = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in pruned]
        obj = obj.fn
    return obj, configs


@dataclass
class TritonReport:
    label: str
    arch: int
    config: str
    registers: int
    stack: int
    local: int
    shared: int  # bytes of shared memory Triton allocates (pipelining buffers)
    wgmma: int  # wgmma.mma_async instructions in the PTX (sm_90 tensor cores)
    mma: int  # mma.sync instructions (sm_80 tensor cores)
    gate: bool

    @property
    def ok(self) -> bool:
        """No spills, and for a gated kernel the architecture's tensor-core instructions."""
        tc = self.wgmma if self.arch >= 90 else self.mma
        return self.stack == 0 and self.local == 0 and (tc > 0 or not self.gate)


def compile_triton(spec: TritonSpec, arch: int) -> list[TritonReport]:
    """Compiles every configuration of ``spec`` for sm_``arch`` (no GPU needed) and reads back the
    resources ptxas assigned."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cnnkern import kernels

    if kernels.INTERPRET:
        raise RuntimeError(
            "cnnkern.kernels was imported under TRITON_INTERPRET=1: the kernels are interpreted "
            "functions and cannot be compiled; run the inspection without TRITON_INTERPRET"
        )
    fn, configs = _triton_fn(spec, arch)
    names = fn.arg_names
    reports = []
    for kwargs, warps, stages in configs:
        const = {**spec.constexprs, **kwargs, **{o: 1 for o in spec.ones}}
        sig = {
            p: "constexpr"
            if p in const
            else (
                f"*{spec.ptr_dtypes.get(p, spec.dtype)}"
                if p.endswith("_ptr")
                else "fp32"
                if p in spec.floats
                else "i32"
            )
            for p in names
        }
        div = [p for p in names if p not in const and (p.endswith("_ptr") or p in spec.div16)]
        src = ASTSource(
            fn=fn,
            signature=sig,
            constexprs={(names.index(k),): v for k, v in const.items()},
            attrs={(names.index(p),): [["tt.divisibility", 16]] for p in div},
        )
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = resource_usage(f.name)[0]
        ptx = k.asm["ptx"]
        cfg = " ".join(f"{a}={b}" for a, b in kwargs.items()) + f" warps={warps} stages={stages}"
        reports.append(
            TritonReport(
                spec.label,
                arch,
                cfg,
                res.registers,
                res.stack,
                res.local,
                int(getattr(k.metadata, "shared", 0)),
                ptx.count("wgmma.mma_async"),
                ptx.count("mma.sync"),
                spec.gate,
            )
        )
    return reports


# ---------------------------------------------------------------------------------------------
# `cnnkern inspect`
# ---------------------------------------------------------------------------------------------
def _demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name
    if not out:
        return name
    out = out.replace("(anonymous namespace)::", "").removeprefix("void ")
    return out.split("(")[0]  # drop the parameter list


def report(archs=(90, 80), triton_kernels: bool = True, cuda_kernels: bool = True, variants: bool = False) -> dict:
    """Everything ``cnnkern inspect`` shows, as plain data."""
    out: dict = {"cuda": None, "triton": [], "variants": []}
    path = extension_path()
    if cuda_kernels and path is not None and cuobjdump() is not None:
        out["cuda"] = {
            "path": path,
            "code": embedded_code(path),
            "kernels": [
                dict(
                    arch=r.arch,
                    name=_demangle(r.name),
                    registers=r.registers,
                    stack=r.stack,
                    shared=r.shared,
                    local=r.local,
                )
                for r in resource_usage(path)
            ],
        }
    if triton_kernels:
        for spec in triton_specs():
            for arch in archs:
                out["triton"] += [dict(r.__dict__, ok=r.ok) for r in compile_triton(spec, arch)]
    if variants:
        for spec in variant_specs():
            for arch in archs:
                out["variants"] += [
                    dict(r.__dict__, ok=r.ok, fits=r.shared <= _SMEM_OPTIN.get(arch, r.shared))
                    for r in compile_triton(spec, arch)
                ]
    return out


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(
        prog="cnnkern inspect",
        description=(
            "Static inspection without a GPU: the ptxas resource usage of every CUDA C++ kernel in "
            "cnnkern._C, and every Triton kernel compiled ahead of time for sm_90 and sm_80 (registers, "
            "spills, shared memory, tensor-core instructions). Exits 1 if a kernel spills or a main "
            "kernel does not use the architecture's tensor cores."
        ),
    )
    ap.add_argument("--arch", default="90,80", help="comma-separated SM versions for the Triton kernels")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument(
        "--variants",
        action="store_true",
        help=(
            "also compile the autotuned conv kernels in fp16, fp32 (TF32 and full), fp64 and NCHW: spills are "
            "reported; a kept configuration over the architecture's shared memory is a problem"
        ),
    )
    args = ap.parse_args(argv)
    data = report(tuple(int(a) for a in args.arch.split(",")), not args.no_triton, not args.no_cuda, args.variants)
    bad = [r for r in data["triton"] if not r["ok"]] + [r for r in data["variants"] if not r["fits"]]
    cuda = data["cuda"]
    if cuda:
        bad += [k for k in cuda["kernels"] if k["local"] or k["stack"]]
    if args.json:
        print(json.dumps(data, indent=1))
        return 1 if bad else 0
    if cuda:
        print(f"cnnkern._C: {cuda['path']}")
        print(f"  machine code: {', '.join(cuda['code']['elf'])}; PTX: {', '.join(cuda['code']['ptx'])}")
        print(f"  {'arch':6} {'regs':>4} {'stack':>5} {'spill':>5} {'smem':>6}  kernel")
        for k in cuda["kernels"]:
            print(f"  {k['arch']:6} {k['registers']:4d} {k['stack']:5d} {k['local']:5d} {k['shared']:6d}  {k['name']}")
    elif not args.no_cuda:
        print(f"cnnkern._C: not loaded ({_backend._C_ERROR})" if _backend._C is None else "cuobjdump not found")
    if data["triton"]:
        print(
            f"\nTriton kernels (compiled ahead of time; no GPU needed)\n"
            f"  {'ok':2} {'arch':4} {'regs':>4} {'stack':>5} {'smem':>6} {'wgmma':>5} {'mma':>4}  kernel / config"
        )
        for r in data["triton"]:
            print(
                f"  {'ok' if r['ok'] else '!!':2} sm{r['arch']:<2} {r['registers']:4d} {r['stack']:5d} "
                f"{r['shared']:6d} {r['wgmma']:5d} {r['mma']:4d}  {r['label']} [{r['config']}]"
            )
    if data["variants"]:
        print(
            f"\nOther dtypes and layouts of the autotuned conv kernels (spills reported, not problems)\n"
            f"  {'ok':2} {'arch':4} {'regs':>4} {'stack':>5} {'smem':>6} {'wgmma':>5} {'mma':>4}  kernel / config"
        )
        for r in data["variants"]:
            mark = "ok" if r["ok"] else "~~" if r["fits"] else "!!"
            print(
                f"  {mark:2} sm{r['arch']:<2} {r['registers']:4d} {r['stack']:5d} {r['shared']:6d} "
                f"{r['wgmma']:5d} {r['mma']:4d}  {r['label']} [{r['config']}]"
            )
        spilled = sum(not r["ok"] for r in data["variants"])
        print(
            f"  {len(data['variants'])} configurations: {spilled} spill or miss the tensor cores (~~), "
            f"{sum(not r['fits'] for r in data['variants'])} over the shared memory (!!)"
        )
    print(f"\n{len(bad)} problem(s)" if bad else "\nno spills; every main kernel uses the tensor cores")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
