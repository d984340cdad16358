"""Compile every Triton kernel of fedhpc.kernels for sm_90 (H100/H200) on a machine without a GPU.

The interpreter used by the tests enforces none of the compiled-mode rules (tl.dot
shape minimums, layouts, shared-memory limits; kernels_hpc.md §2.3), so CI compiles
each kernel through PTX to a cubin at the constexpr configs its launcher picks for
representative ranks, reads the shared memory from the compiled metadata and the
registers / local-memory (spill) bytes from ``cuobjdump --dump-resource-usage``
(bundled with triton), and exits 1 when a compile fails, a kernel needs more than
227 KiB of shared memory (the sm_90 per-block maximum), or registers spill.

Usage: python tools/aot_compile_triton.py [--arch 90]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit must build compilable JITFunctions
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fedhpc.kernels.cholqr import triton as cholqr  # noqa: E402
from fedhpc.kernels.segment import triton as segment  # noqa: E402
from fedhpc.kernels.similarity import triton as similarity  # noqa: E402

SHARED_LIMIT = 227 * 1024
CHOLQR_RANKS = (4, 32, 64)
SIMILARITY_RANKS = (1, 4, 8, 16, 64, 128)
"""Representative widths r; each maps to the constexprs its launcher would pick."""


def cases():
    """(label, kernel, signature, constexprs, num_warps) for every kernel x config."""
    strides = {"d": "i32", "r": "i32", "sxb": "i32", "sxd": "i32", "sxr": "i32"}
    for r in CHOLQR_RANKS:
        cfg = cholqr.launch_config(r)
        warps = cfg.pop("num_warps")
        for has_w in (False, True):
            yield (f"cholqr_gram r={r} HAS_W={has_w}", cholqr._gram_kernel,
                   {"X": "*fp32", "W": "*fp32", "G": "*fp32", **strides,
                    "HAS_W": "constexpr", "RP": "constexpr", "BLOCK_D": "constexpr"},
                   {"HAS_W": has_w, **cfg}, warps)
        yield (f"cholqr_apply r={r}", cholqr._apply_kernel,
               {"X": "*fp32", "W1": "*fp32", "W2": "*fp32", "Q": "*fp32", **strides,
                "RP": "constexpr", "BLOCK_D": "constexpr"}, cfg, warps)
    for r in SIMILARITY_RANKS:
        cfg = similarity.launch_config(r)
        warps = cfg.pop("num_warps")
        for symmetric in (True, False):
            yield (f"similarity r={r} SYMMETRIC={symmetric}", similarity._similarity_kernel,
                   {"U": "*fp32", "V": "*fp32", "RU": "*i32", "RV": "*i32", "S": "*fp32",
                    **{k: "i32" for k in ("n", "m", "d", "sun", "sud", "sur", "svn", "svd", "svr")},
                    **{k: "constexpr" for k in ("SYMMETRIC", "RP", "BN", "BM", "BLOCK_K")}},
                   {"SYMMETRIC": symmetric, **cfg}, warps)
    cfg = dict(segment.LAUNCH_CONFIG)
    warps = cfg.pop("num_warps")
    for values, acc in (("fp32", "fp64"), ("bf16", "fp32")):
        yield (f"segment_sum values={values} acc={acc}", segment._segment_sum_kernel,
               {"VALUES": f"*{values}", "ORDER": "*i64", "OFFSETS": "*i64", "WEIGHTS": "*fp32",
                "OUT": f"*{acc}", "F": "i32", "stride_c": "i32", "BLOCK_F": "constexpr"}, cfg, warps)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / LOCAL of the single function in a cubin, via the bundled cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90)")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}, shared-memory limit {SHARED_LIMIT} B")
    print(f"{'kernel':44s} {'warps':>5s} {'shared B':>9s} {'regs':>5s} {'spill B':>8s} {'time':>6s}")
    failures = 0
    for label, fn, signature, constexprs, warps in cases():
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=target,
                                      options={"num_warps": warps})
        except Exception as err:  # report every kernel, then fail
            failures += 1
            print(f"{label:44s} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        shared = compiled.metadata.shared
        usage = resource_usage(compiled.asm["cubin"])
        spill = usage.get("LOCAL", 0) + usage.get("STACK", 0)
        problem = ("  > shared-memory limit" if shared > SHARED_LIMIT else "") + ("  spills" if spill else "")
        failures += bool(problem)
        print(f"{label:44s} {warps:5d} {shared:9d} {usage.get('REG', -1):5d} {spill:8d} "
              f"{time.perf_counter() - start:5.1f}s{problem}")
    print("OK" if not failures else f"{failures} kernel config(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
