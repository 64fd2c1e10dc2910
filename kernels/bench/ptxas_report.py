"""Register, spill and shared-memory report of the hybrid attention's Triton kernels, without a GPU.

    python -m kernels.bench.ptxas_report                  # H100 (sm_90a), bf16, both model shapes
    python -m kernels.bench.ptxas_report --arch 80 --dtype fp16 --seq-len 2048 --json report.json
    python -m kernels.bench.ptxas_report --set bwd_dkv_window=num_warps:4,block_q:16 --kernels bwd_dkv_window

How: the real host functions (`hybrid_attention_fwd` / `_bwd`, `hybrid_decode_step` in triton_api.py)
run on `meta` tensors while `JITFunction.run` is replaced by a recorder, so every launch they would
make (kernel, argument dtypes, constexprs, num_warps, num_stages) is captured exactly as on the
device. Each recorded launch is cross-compiled with `triton.compile(ASTSource(...), target=
GPUTarget("cuda", arch, 32))`, and the PTX goes through the wheel's ptxas with `-v`, whose output
gives registers per thread, spill stores/loads (bytes) and static shared memory. Pointers and
integer arguments divisible by 16 get the 16-divisibility hint, as the JIT gives them at run time.

The kernels must be real JITFunctions, so TRITON_INTERPRET must be 0 when they are defined; when it is
set to 1 (tests/conftest.py does that) the script re-runs itself in a child process with 0.
Shapes (bf16, window 64, chunk 64 unless told): "llama" Hq 32, Hkv 8, D 128, F 128 and "smollm2"
Hq 9, Hkv 3, D 64, F 128. Compiling every kernel for both shapes takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys

SHAPES = {
    "llama": dict(num_q_heads=32, num_kv_heads=8, head_dim=128, feature_dim=128),
    "smollm2": dict(num_q_heads=9, num_kv_heads=3, head_dim=64, feature_dim=128),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int32": "i32", "int64": "i64"}


def _reexec_without_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        env = dict(os.environ, TRITON_INTERPRET="0")
        sys.exit(subprocess.call([sys.executable, "-m", "kernels.bench.ptxas_report", *sys.argv[1:]], env=env))


@contextlib.contextmanager
def recorded_launches():
    """Replace JITFunction.run by a recorder; yields the list of (kernel, args, kwargs) launches."""
    from triton.runtime.jit import JITFunction

    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, grid))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def compile_signature(kernel, args, kwargs):
    """ASTSource signature, constexprs and divisibility attributes of one recorded launch."""
    import torch

    signature, constexprs, attrs, options = {}, {}, {}, {}
    positional = list(args)
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = kwargs[name] if name in kwargs else param.default
            continue
        value = positional[index] if index < len(positional) else kwargs[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} of type {type(value).__name__}")
    for name in ("num_warps", "num_stages"):
        if name in kwargs:
            options[name] = kwargs[name]
    return signature, constexprs, attrs, options


def ptxas_stats(ptx: str, arch: int, ptxas: str) -> dict:
    """Registers, spill bytes and shared memory of the PTX's single entry, from `ptxas -v`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr

    def number(pattern, default=0):
        match = re.search(pattern, text)
        return int(match.group(1)) if match else default

    return dict(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack=number(r"(\d+) bytes stack frame"),
        ptx_shared=number(r"(\d+) bytes smem"),
    )


def compile_launch(kernel, args, kwargs, arch: int, ptxas: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs, options = compile_signature(kernel, args, kwargs)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    stats = ptxas_stats(compiled.asm["ptx"], arch, ptxas)
    # Triton's shared memory (dynamic, for dot operands and layout conversions) is in the metadata.
    stats["shared"] = int(getattr(compiled.metadata, "shared", 0))
    tile_names = ("BT", "BQ", "BD", "BF", "BFS", "BDS", "BDV", "BW", "KSPAN", "SUPER", "REVERSE")
    tiles = {k: v for k, v in constexprs.items() if k in tile_names}
    return dict(kernel=kernel.__name__, num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3),
                tiles=tiles, **stats)


# Kernel function → its name in triton_api.KERNEL_NAMES.
KERNEL_OF = {
    "_state_fwd_kernel": "state_fwd", "_hybrid_fwd_kernel": "fwd", "_bwd_dq_window_kernel": "bwd_dq_window",
    "_bwd_dq_linear_kernel": "bwd_dq_linear", "_state_bwd_kernel": "state_bwd",
    "_bwd_dkv_linear_kernel": "bwd_dkv_linear", "_bwd_dkv_window_kernel": "bwd_dkv_window",
    "_hybrid_decode_kernel": "decode",
    # Super-chunk kernels (M > 1). The prefix kernel serves both scans (REVERSE tells them apart in the rows); the
    # --kernels filter files it under state_fwd.
    "_state_local_kernel": "state_fwd", "_state_prefix_kernel": "state_fwd", "_dstate_local_kernel": "state_bwd",
    "_bwd_dkv_linear_carry_kernel": "bwd_dkv_linear",
}


def launch_configs_for(fields: dict, shape: dict) -> dict:
    """{kernel: {field: value}} on top of the shape's table row → {kernel: LaunchConfig}."""
    import dataclasses

    from kernels.hybrid_attention.triton_api import resolve_launch_configs

    row = resolve_launch_configs(shape["head_dim"], shape["feature_dim"])
    return {kernel: dataclasses.replace(row[kernel], **values) for kernel, values in fields.items()}


def record_shape(shape: dict, dtype_name: str, seq_len: int, window_size: int, window_kind: str,
                 chunk_size: int, decode: bool, overrides: dict | None = None) -> list:
    """Every launch of one forward + backward (and one decode step) at this shape, on meta tensors."""
    import torch

    from kernels.hybrid_attention import triton_api
    from kernels.hybrid_attention.naive import HybridState

    dtype = getattr(torch, DTYPES[dtype_name])
    hq, hkv, d, f = shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"], shape["feature_dim"]
    meta = dict(device="meta", dtype=dtype)
    q, dy = torch.empty(1, hq, seq_len, d, **meta), torch.empty(1, hq, seq_len, d, **meta)
    k, v = torch.empty(1, hkv, seq_len, d, **meta), torch.empty(1, hkv, seq_len, d, **meta)
    q_feat, k_feat = torch.empty(1, hq, seq_len, f, **meta), torch.empty(1, hq, seq_len, f, **meta)
    gamma = torch.empty(hq, device="meta", dtype=torch.float32)
    with recorded_launches() as launches, triton_api.launch_configs(**(overrides or {})):
        geo = triton_api._Geometry(q, k, q_feat, window_size, window_kind, chunk_size)
        y, row_max, arg_max, denom = triton_api.hybrid_attention_fwd(q, k, v, q_feat, k_feat, gamma, geo)
        triton_api.hybrid_attention_bwd(dy, q, k, v, q_feat, k_feat, gamma, y, row_max, arg_max, denom, geo)
        if decode:
            batch, window = 8, window_size - 1
            state = HybridState(
                kv=torch.empty(batch, hq, f, d, device="meta"), k_sum=torch.empty(batch, hq, f, device="meta"),
                window_k=torch.empty(batch, hkv, window, d, **meta), window_v=torch.empty(batch, hkv, window, d, **meta),
                window_k_feat=torch.empty(batch, hq, window, f, **meta), num_tokens=1000)
            step = [torch.empty(batch, h, 1, x, **meta) for h, x in ((hq, d), (hkv, d), (hkv, d), (hq, f), (hq, f))]
            with contextlib.suppress(NotImplementedError, RuntimeError):  # torch.cat on meta is fine; be safe
                triton_api.hybrid_decode_step(*step, gamma, state, window_size, window_kind, False)
    return launches


def format_table(rows: list) -> str:
    header = f"{'shape':8} {'kernel':24} {'warps':>5} {'stages':>6} {'tiles':34} {'regs':>4} {'spill st':>8} " \
             f"{'spill ld':>8} {'smem KiB':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        tiles = " ".join(f"{k}={v}" for k, v in r["tiles"].items())
        lines.append(f"{r['shape']:8} {r['kernel']:24} {r['num_warps']:>5} {r['num_stages']:>6} {tiles:34} "
                     f"{r['registers']:>4} {r['spill_stores']:>8} {r['spill_loads']:>8} {r['shared'] / 1024:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90 = H100, 80 = A100)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["smollm2", "llama"])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--window-size", type=int, default=64)
    parser.add_argument("--window-kind", choices=["sliding", "terrace"], default="terrace")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--no-decode", action="store_true", help="skip the decode kernel")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--set", action="append", metavar="KERNEL=FIELD:VALUE,...",
                        help="override a kernel's LaunchConfig fields, e.g. bwd_dkv_linear=num_warps:8,block_q:16 "
                             "(kernel names: triton_api.KERNEL_NAMES)")
    parser.add_argument("--kernels", nargs="+", help="only these kernels (KERNEL_NAMES), e.g. bwd_dkv_linear")
    args = parser.parse_args(argv)
    _reexec_without_interpreter()

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    from kernels.hybrid_attention.triton_api import KERNEL_NAMES

    overrides = {}
    for item in args.set or []:  # merge --set flags into LaunchConfigs on top of the table row
        kernel, _, fields = item.partition("=")
        if kernel not in KERNEL_NAMES:
            parser.error(f"--set {item}: unknown kernel {kernel!r}; one of {KERNEL_NAMES}")
        overrides.setdefault(kernel, {}).update(
            {k: int(v) for k, v in (field.split(":") for field in fields.split(",") if field)})
    rows = []
    for shape_name in args.shapes:
        launches = record_shape(SHAPES[shape_name], args.dtype, args.seq_len, args.window_size, args.window_kind,
                                args.chunk_size, not args.no_decode, launch_configs_for(overrides, SHAPES[shape_name]))
        seen = set()
        for kernel, kernel_args, kwargs, _grid in launches:
            if args.kernels and KERNEL_OF[kernel.__name__] not in args.kernels:
                continue
            row = compile_launch(kernel, kernel_args, kwargs, args.arch, ptxas)
            key = (row["kernel"], row["num_warps"], row["num_stages"], tuple(row["tiles"].items()))
            if key in seen:  # the state scan runs in the forward and again in the backward
                continue
            seen.add(key)
            rows.append(dict(shape=shape_name, **row))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(f"sm_{args.arch}, {args.dtype}, T={args.seq_len}, {args.window_kind} window {args.window_size}, "
          f"chunk {args.chunk_size}, triton {triton.__version__}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, dtype=args.dtype, triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
