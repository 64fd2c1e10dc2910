"""GPU benchmark of the Triton hybrid attention (training forward/backward and the decode step).

    python -m kernels.bench.hybrid_attention_bench --quick           # a few shapes, < 2 minutes on an H100
    python -m kernels.bench.hybrid_attention_bench --out bench.json  # the full table (~2 minutes)
    python -m kernels.bench.hybrid_attention_bench --quick --super-chunks 1 8   # also time M = 1 and 8
    python -m kernels.bench.hybrid_attention_bench --quick --launch-table tune.json   # a tune run's configs

The Triton rows use the launch table of triton_api.py (DEFAULT_LAUNCH_CONFIGS: the row's super-chunk size M
included; `--launch-table` first replaces rows with those of a hybrid_attention_tune JSON; the JSON's settings
record each shape's row); `--super-chunks M ...` adds rows "triton_hybrid_m{M}" with that M for the states and
the state gradients instead (checked and timed alike).

Order of work, per (model shape, window kind, T), with B = max(1, tokens // T) sequences:
(1) correctness on the device: the Triton output and all six gradients on the first sequences
    against the fp32 reference on the same bf16 inputs (quadratic_hybrid_attention for T <= 4096,
    chunked_hybrid_attention beyond; gradients up to T = 16384, the output at every T); a row that
    fails is reported and not timed;
(2) forward and forward+backward milliseconds (triton.testing.do_bench, median after warm-up) of the
    Triton kernels, torch SDPA causal attention (flash backend, GQA), FlexAttention with the same
    window as a block mask (the softmax-only part of the hybrid; at --flex-seq-lens, since each
    shape compiles; first window kind only), and the quadratic reference where its T×T weights fit
    (small T).
Achieved TFLOP/s and GB/s are set against ceilings measured in the same run (a bf16 matmul and a
device copy). FLOPs are the algorithm's useful work: hybrid 4·D·W̄ + 4·F·D per query head and
token (window QKᵀ and PV over W̄ keys on average, state update and read), SDPA causal 2·D·T per
query head and token, FlexAttention 4·D·W̄, quadratic reference (4·D + 2·F)·T; backward counted as
2.5× forward (the FlashAttention convention). Bytes are the tensors each method must read and write
once (inputs, outputs, and in the backward dy and the gradients).
Decode: the fused step (and the in-place variant) against recurrent_hybrid_step and SDPA over a
KV cache, at growing context lengths; the hybrid step should be flat.
Prints tables and writes JSON with the device name, versions and command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from kernels.hybrid_attention import (
    chunked_hybrid_attention,
    prefill_hybrid_state,
    quadratic_hybrid_attention,
    recurrent_hybrid_step,
)
from kernels.hybrid_attention.triton_api import (
    launch_configs,
    load_launch_table,
    resolve_launch_configs,
    triton_hybrid_attention,
    triton_hybrid_decode_step,
)

SHAPES = {
    "llama3-8b": dict(num_q_heads=32, num_kv_heads=8, head_dim=128),
    "smollm2-135m": dict(num_q_heads=9, num_kv_heads=3, head_dim=64),
}
FEATURE_DIM = 128  # Hedgehog: [softmax(xW) ‖ softmax(−xW)] with W of 64 columns
FEATURE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
INPUT_NAMES = ("q", "k", "v", "q_feat", "k_feat", "gamma")
# RMS error / RMS of the fp32 reference allowed for the bf16 kernels, as in the GPU tests. dγ sums E·dP
# over every token and cancels heavily; its error comes from δ = dy·y read from the bf16 output.
CHECK_RATIOS = {"y": 1e-2, "dgamma": 5e-2}
CHECK_RATIO = 2e-2  # every other gradient
QUADRATIC_MAX_ELEMENTS = 2**30  # B·H·T² fp32 weights the quadratic reference may materialise
DEVICE = "cuda"  # a dry run of the script's logic may set "cpu" under TRITON_INTERPRET=1


# ----------------------------------------------------------------------------------------------
# Inputs, references, metrics
# ----------------------------------------------------------------------------------------------


def make_inputs(batch, shape, num_tokens, seed=0, dtype=torch.bfloat16, feature_dtype=None):
    """bf16 inputs; feature_dtype=torch.float32 gives fp32 features beside bf16 q, k, v, as the pipeline's Hedgehog
    maps hand them over with attention.feature_dtype 'float32' (the kernels then compute in fp32)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    num_q_heads, num_kv_heads, head_dim = shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"]

    def randn(*size):
        return torch.randn(*size, device=DEVICE, generator=gen)

    def features():
        x = randn(batch, num_q_heads, num_tokens, FEATURE_DIM // 2) * 2
        return torch.cat([x.softmax(-1), (-x).softmax(-1)], dim=-1).to(feature_dtype or dtype)

    return dict(
        q=randn(batch, num_q_heads, num_tokens, head_dim).to(dtype),
        k=randn(batch, num_kv_heads, num_tokens, head_dim).to(dtype),
        v=randn(batch, num_kv_heads, num_tokens, head_dim).to(dtype),
        q_feat=features(),
        k_feat=features(),
        gamma=torch.rand(num_q_heads, device=DEVICE, generator=gen) * 0.8 + 0.1,
    )


def rms_ratio(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = max(expected.pow(2).mean().sqrt().item(), 1e-6)
    return (actual - expected).pow(2).mean().sqrt().item() / scale


def check(inputs, window_size, window_kind, with_grads) -> dict:
    """The kernels against the fp32 reference on the same inputs; returns the error ratios."""
    num_tokens = inputs["q"].shape[2]
    reference_fn = quadratic_hybrid_attention if num_tokens <= 4096 else chunked_hybrid_attention
    leaves = {n: t.detach().clone().requires_grad_(with_grads) for n, t in inputs.items()}
    reference = {n: t.detach().float().clone().requires_grad_(with_grads) for n, t in inputs.items()}
    with torch.set_grad_enabled(with_grads):
        y = triton_hybrid_attention(**leaves, window_size=window_size, window_kind=window_kind)
        y_ref = reference_fn(**reference, window_size=window_size, window_kind=window_kind)
    errors = {"y": rms_ratio(y, y_ref)}
    if with_grads:
        # One fixed dy, so rows that differ only in launch settings (--super-chunks) are checked alike.
        dy = torch.randn(y_ref.shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1))
        grads = torch.autograd.grad(y, list(leaves.values()), dy.to(y.dtype))
        grads_ref = torch.autograd.grad(y_ref, list(reference.values()), dy)
        errors.update({f"d{n}": rms_ratio(g, r) for n, g, r in zip(INPUT_NAMES, grads, grads_ref)})
    errors["ok"] = all(value <= CHECK_RATIOS.get(name, CHECK_RATIO) for name, value in errors.items())
    errors["reference"] = reference_fn.__name__
    return errors


def mean_window(window_size: int, window_kind: str) -> float:
    """W̄, the average number of window keys per query far from the start."""
    return float(window_size) if window_kind == "sliding" else 1.5 * window_size - 0.5


def base_method(method: str) -> str:
    """triton_hybrid_m8 → triton_hybrid (the variants with another super-chunk size do the same work)."""
    return "triton_hybrid" if method.startswith("triton_hybrid") else method


def flops(method, batch, shape, num_tokens, window_size, window_kind) -> float:
    """Forward FLOPs of the useful work of each method (see the module docstring)."""
    method = base_method(method)
    rows = batch * shape["num_q_heads"] * num_tokens
    head_dim = shape["head_dim"]
    if method == "triton_hybrid":
        return rows * (4 * head_dim * mean_window(window_size, window_kind) + 4 * FEATURE_DIM * head_dim)
    if method == "flex_window":
        return rows * 4 * head_dim * mean_window(window_size, window_kind)
    if method == "sdpa_causal":
        return rows * 2 * head_dim * num_tokens
    if method == "quadratic_reference":
        return rows * (4 * head_dim + 2 * FEATURE_DIM) * num_tokens
    raise KeyError(method)


def io_bytes(method, batch, shape, num_tokens, backward: bool) -> float:
    """Bytes each method must move at least once (bf16 tensors)."""
    method = base_method(method)
    q_size = batch * shape["num_q_heads"] * num_tokens * shape["head_dim"] * 2
    kv_size = batch * shape["num_kv_heads"] * num_tokens * shape["head_dim"] * 2
    feat_size = batch * shape["num_q_heads"] * num_tokens * FEATURE_DIM * 2
    inputs = q_size + 2 * kv_size + (2 * feat_size if method in ("triton_hybrid", "quadratic_reference") else 0)
    forward = inputs + q_size  # + y
    if not backward:
        return forward
    return forward + (inputs + 2 * q_size) + inputs  # read inputs, y, dy; write the gradients


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------


def sdpa_causal(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def timed_baseline(row: dict, bench, make_fn, tensors) -> dict:
    """Fill row with fwd/fwd+bwd ms of the baseline make_fn() builds; a baseline that cannot run here
    records its error instead of ending the (short) GPU session."""
    try:
        fn = make_fn()
        row["fwd_ms"] = time_method(bench, fn, tensors, backward=False)
        row["fwd_bwd_ms"] = time_method(bench, fn, tensors, backward=True)
    except Exception as error:  # noqa: BLE001 - reported in the table and the JSON
        row["error"] = f"{type(error).__name__}: {error}"[:300]
        print(f"  {row['method']} T={row['T']}: {row['error']}", flush=True)
    return row


_FLEX_CACHE: dict = {}


def flex_window(window_size, window_kind, num_tokens):
    """FlexAttention (compiled) with the hybrid's window as a block mask: the softmax-only part."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX_CACHE:
        _FLEX_CACHE["fn"] = torch.compile(flex_attention)

    def in_window(b, h, q_idx, kv_idx):
        causal = kv_idx <= q_idx
        if window_kind == "sliding":
            return causal & (q_idx - kv_idx < window_size)
        return causal & (kv_idx // window_size >= q_idx // window_size - 1)

    block_mask = create_block_mask(in_window, B=None, H=None, Q_LEN=num_tokens, KV_LEN=num_tokens, device=DEVICE)
    compiled = _FLEX_CACHE["fn"]
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def time_method(bench, fn, tensors, backward: bool) -> float:
    """Median ms of fn(*tensors) (no autograd) or of fn(*tensors).backward(dy)."""
    if not backward:
        with torch.no_grad():
            return bench(lambda: fn(*tensors))
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    y = fn(*leaves)
    dy = torch.randn_like(y)

    def step():
        fn(*leaves).backward(dy)

    return bench(step, grad_to_none=leaves)


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def measure_ceilings(bench) -> dict:
    size = 8192 if DEVICE == "cuda" else 256
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    matmul_ms = bench(lambda: a @ b)
    src = torch.empty(2**29 if DEVICE == "cuda" else 2**20, device=DEVICE, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    return dict(bf16_matmul_tflops=2 * size**3 / matmul_ms / 1e9, copy_gbps=2 * src.numel() * 2 / copy_ms / 1e6)


def table_row(shape: dict) -> dict:
    """The launch settings triton_hybrid_attention uses at this shape (JSON form)."""
    return {kernel: config.as_dict() for kernel, config in
            resolve_launch_configs(shape["head_dim"], FEATURE_DIM).items()}


def super_chunk_override(shape: dict, super_chunk: int | None):
    """launch_configs(...) with the table's state_fwd / state_bwd settings at this shape, but M = super_chunk
    (None: the table as it is)."""
    import contextlib
    import dataclasses

    if super_chunk is None:
        return contextlib.nullcontext()
    row = resolve_launch_configs(shape["head_dim"], FEATURE_DIM)
    return launch_configs(**{kernel: dataclasses.replace(row[kernel], super_chunk=super_chunk)
                             for kernel in ("state_fwd", "state_bwd")})


def run_training(args, bench, ceilings) -> list[dict]:
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for num_tokens in args.seq_lens:
            batch = max(1, args.tokens // num_tokens)
            inputs = make_inputs(batch, shape, num_tokens, feature_dtype=FEATURE_DTYPES[args.feature_dtype])
            tensors = [inputs[n] for n in INPUT_NAMES]
            base = dict(shape=shape_name, T=num_tokens, B=batch, window_size=args.window_size)
            for window_kind in args.window_kinds:
                started = time.time()
                check_batch = 1 if num_tokens >= 4096 else min(batch, 2)
                all_ok = True
                for super_chunk in [None, *args.super_chunks]:
                    method = "triton_hybrid" if super_chunk is None else f"triton_hybrid_m{super_chunk}"
                    row = dict(base, window_kind=window_kind, method=method)
                    with super_chunk_override(shape, super_chunk):
                        try:
                            row["check"] = errors = check(
                                {n: t[:check_batch] if t.dim() == 4 else t for n, t in inputs.items()},
                                args.window_size, window_kind, with_grads=num_tokens <= 16384)
                        except Exception as error:  # noqa: BLE001 - a kernel that cannot run is a failed check
                            row["check"] = errors = dict(ok=False, error=f"{type(error).__name__}: {error}"[:300])
                        if errors["ok"]:  # refuse to time a kernel that gives wrong answers
                            hybrid = lambda *t, _kind=window_kind: triton_hybrid_attention(  # noqa: E731
                                *t, window_size=args.window_size, window_kind=_kind, chunk_size=args.chunk_size)
                            row["fwd_ms"] = time_method(bench, hybrid, tensors, backward=False)
                            row["fwd_bwd_ms"] = time_method(bench, hybrid, tensors, backward=True)
                    all_ok = all_ok and errors["ok"]
                    rows.append(row)
                # FlexAttention compiles per shape, so it runs for the first window kind only.
                if num_tokens in args.flex_seq_lens and not args.no_flex and window_kind == args.window_kinds[0]:
                    make_flex = lambda _kind=window_kind, _n=num_tokens: flex_window(  # noqa: E731
                        args.window_size, _kind, _n)
                    rows.append(timed_baseline(dict(base, window_kind=window_kind, method="flex_window"), bench,
                                               make_flex, tensors[:3]))
                print(f"  {shape_name} T={num_tokens} B={batch} {window_kind}: check "
                      f"{'ok' if all_ok else 'FAILED'} ({time.time() - started:.1f}s)", flush=True)
            rows.append(timed_baseline(dict(base, window_kind="causal", method="sdpa_causal"), bench,
                                       lambda: sdpa_causal, tensors[:3]))
            if batch * shape["num_q_heads"] * num_tokens**2 <= QUADRATIC_MAX_ELEMENTS:
                quadratic = lambda *t: quadratic_hybrid_attention(  # noqa: E731
                    *t, window_size=args.window_size, window_kind=args.window_kinds[0])
                rows.append(timed_baseline(dict(base, window_kind=args.window_kinds[0], method="quadratic_reference"),
                                           bench, lambda: quadratic, tensors))
            del inputs, tensors
            torch.cuda.empty_cache()
    for row in rows:
        shape = SHAPES[row["shape"]]
        kind = row["window_kind"] if row["window_kind"] != "causal" else "sliding"
        fwd_flops = flops(row["method"], row["B"], shape, row["T"], row["window_size"], kind)
        for key, factor, backward in (("fwd", 1.0, False), ("fwd_bwd", 3.5, True)):
            if f"{key}_ms" not in row:
                continue
            seconds = row[f"{key}_ms"] / 1e3
            row[f"{key}_tflops"] = factor * fwd_flops / seconds / 1e12
            row[f"{key}_gbps"] = io_bytes(row["method"], row["B"], shape, row["T"], backward) / seconds / 1e9
            row[f"{key}_of_matmul_ceiling"] = row[f"{key}_tflops"] / ceilings["bf16_matmul_tflops"]
            row[f"{key}_of_copy_ceiling"] = row[f"{key}_gbps"] / ceilings["copy_gbps"]
    return rows


def run_decode(args, bench) -> list[dict]:
    """Decode step time against context length, llama3-8b shape, batch args.decode_batch."""
    shape = SHAPES["llama3-8b"]
    batch, rows = args.decode_batch, []
    for window_kind in args.window_kinds:
        for context in args.decode_contexts:
            inputs = make_inputs(batch, shape, context + 1, seed=1)
            state = prefill_hybrid_state(inputs["k"][:, :, :context], inputs["v"][:, :, :context],
                                         inputs["k_feat"][:, :, :context], args.window_size, window_kind)
            step = {n: inputs[n][:, :, context:].contiguous() for n in INPUT_NAMES[:5]}
            gamma = inputs["gamma"]
            y, new_state = triton_hybrid_decode_step(**step, gamma=gamma, state=state,
                                                     window_size=args.window_size, window_kind=window_kind)
            y_ref, state_ref = recurrent_hybrid_step(**step, gamma=gamma, state=state,
                                                     window_size=args.window_size, window_kind=window_kind)
            errors = dict(y=rms_ratio(y, y_ref), kv=rms_ratio(new_state.kv, state_ref.kv))
            ok = errors["y"] <= CHECK_RATIO and errors["kv"] <= 1e-4
            row = dict(window_kind=window_kind, context=context, B=batch, check=dict(errors, ok=ok))
            if ok:
                row["triton_step_ms"] = bench(lambda: triton_hybrid_decode_step(
                    **step, gamma=gamma, state=state, window_size=args.window_size, window_kind=window_kind))
                scratch = prefill_hybrid_state(inputs["k"][:, :, :context], inputs["v"][:, :, :context],
                                               inputs["k_feat"][:, :, :context], args.window_size, window_kind)
                row["triton_step_inplace_ms"] = bench(lambda: triton_hybrid_decode_step(
                    **step, gamma=gamma, state=scratch, window_size=args.window_size, window_kind=window_kind,
                    inplace=True))
            row["naive_step_ms"] = bench(lambda: recurrent_hybrid_step(
                **step, gamma=gamma, state=state, window_size=args.window_size, window_kind=window_kind))
            cache_k, cache_v = inputs["k"], inputs["v"]  # softmax attention reads the whole cache
            with torch.no_grad():
                row["sdpa_cache_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    step["q"], cache_k, cache_v, enable_gqa=True))
            rows.append(row)
            print(f"  decode {window_kind} context={context}: check {'ok' if ok else 'FAILED'}", flush=True)
            del inputs, state, step
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def print_tables(result):
    print(f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}")
    ceilings = result["ceilings"]
    print(f"ceilings: bf16 matmul {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s, copy {ceilings['copy_gbps']:.0f} GB/s")
    sdpa = {(r["shape"], r["T"]): r for r in result["training"] if r["method"] == "sdpa_causal"}
    header = (f"{'shape':13s} {'T':>6s} {'B':>3s} {'kind':8s} {'method':20s} {'fwd ms':>9s} {'f+b ms':>9s} "
              f"{'fwd TF/s':>8s} {'f+b TF/s':>8s} {'fwd GB/s':>8s} {'vs sdpa f':>9s} {'vs sdpa f+b':>11s} check")
    print(header)
    for r in result["training"]:
        ref = sdpa.get((r["shape"], r["T"]), {})

        def fmt(key, spec=".3f"):
            return format(r[key], spec) if key in r else "-"

        speed_f = f"{ref['fwd_ms'] / r['fwd_ms']:.1f}x" if "fwd_ms" in r and ref else "-"
        speed_fb = f"{ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x" if "fwd_bwd_ms" in r and ref else "-"
        status = "" if "check" not in r else ("ok" if r["check"]["ok"] else "FAILED " + json.dumps(r["check"]))
        status = r.get("error", status)
        print(f"{r['shape']:13s} {r['T']:6d} {r['B']:3d} {r['window_kind']:8s} {r['method']:20s} {fmt('fwd_ms'):>9s} "
              f"{fmt('fwd_bwd_ms'):>9s} {fmt('fwd_tflops', '.1f'):>8s} {fmt('fwd_bwd_tflops', '.1f'):>8s} "
              f"{fmt('fwd_gbps', '.0f'):>8s} {speed_f:>9s} {speed_fb:>11s} {status}")
    if result["decode"]:
        print(f"\n{'decode kind':11s} {'context':>8s} {'B':>3s} {'triton ms':>9s} {'inplace ms':>10s} "
              f"{'naive ms':>9s} {'sdpa cache ms':>13s} check")
        for r in result["decode"]:
            def fmt(key):
                return f"{r[key]:.4f}" if key in r else "-"
            print(f"{r['window_kind']:11s} {r['context']:8d} {r['B']:3d} {fmt('triton_step_ms'):>9s} "
                  f"{fmt('triton_step_inplace_ms'):>10s} {fmt('naive_step_ms'):>9s} {fmt('sdpa_cache_ms'):>13s} "
                  f"{'ok' if r['check']['ok'] else 'FAILED ' + json.dumps(r['check'])}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes (< 2 minutes on an H100)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="model shapes (default: all)")
    parser.add_argument("--seq-lens", nargs="+", type=int, help="T values (default 1k..64k; quick 2k 8k 32k)")
    parser.add_argument("--tokens", type=int, default=32768, help="B·T per step: B = max(1, tokens // T)")
    parser.add_argument("--window-size", type=int, default=64, help="window size w")
    parser.add_argument("--window-kinds", nargs="+", choices=["sliding", "terrace"],
                        help="window kinds (default both; quick: sliding)")
    parser.add_argument("--chunk-size", type=int, default=None, help="Triton tile size (default: the API's, 64)")
    parser.add_argument("--flex-seq-lens", nargs="+", type=int,
                        help="T values that also time FlexAttention (each compiles; default 4k 32k; quick 8k)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--decode-contexts", nargs="+", type=int, help="context lengths of the decode table")
    parser.add_argument("--decode-batch", type=int, default=8, help="sequences per decode step")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode table")
    parser.add_argument("--feature-dtype", choices=sorted(FEATURE_DTYPES), default="bfloat16",
                        help="dtype of q_feat/k_feat (float32: the pipeline's path with attention.feature_dtype "
                             "'float32', which takes every operand to fp32)")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per case (ms)")
    parser.add_argument("--launch-table", metavar="TUNE_JSON",
                        help="apply the 'table' of a kernels.bench.hybrid_attention_tune JSON (load_launch_table)")
    parser.add_argument("--super-chunks", nargs="+", type=int, default=[], metavar="M",
                        help="also check and time the Triton kernels with these super-chunk sizes (rows "
                             "triton_hybrid_m{M}; the table's M is the triton_hybrid row)")
    default_out = os.path.join(os.environ["OUT"], "hybrid_attention_bench.json") if os.environ.get("OUT") else \
        "hybrid_attention_bench.json"
    parser.add_argument("--out", default=default_out, help=f"JSON output path (default {default_out})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (run it on the GPU machine)")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set; unset it to time the compiled kernels")
    if args.launch_table:
        load_launch_table(args.launch_table)
    quick = args.quick
    args.shapes = args.shapes or sorted(SHAPES)
    args.seq_lens = args.seq_lens or ([2048, 8192, 32768] if quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536])
    args.window_kinds = args.window_kinds or (["sliding"] if quick else ["sliding", "terrace"])
    args.flex_seq_lens = args.flex_seq_lens or ([8192] if quick else [4096, 32768])
    args.decode_contexts = args.decode_contexts or ([1024, 16384] if quick else [1024, 4096, 16384, 65536])

    import triton
    import triton.testing

    def bench(fn, grad_to_none=None):
        return triton.testing.do_bench(fn, warmup=25, rep=args.rep_ms, grad_to_none=grad_to_none,
                                       return_mode="median")

    started = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        command=" ".join([sys.executable, "-m", "kernels.bench.hybrid_attention_bench", *sys.argv[1:]]),
        settings=dict(tokens=args.tokens, window_size=args.window_size, chunk_size=args.chunk_size,
                      feature_dim=FEATURE_DIM, dtype="bfloat16", feature_dtype=args.feature_dtype,
                      check_ratios=dict(CHECK_RATIOS, other=CHECK_RATIO),
                      flops=("hybrid 4·D·W̄ + 4·F·D, flex 4·D·W̄, sdpa causal 2·D·T, quadratic (4·D + 2·F)·T "
                             "per query head and token; backward = 2.5× forward"),
                      shapes={name: SHAPES[name] for name in args.shapes},
                      launch_configs={name: table_row(SHAPES[name]) for name in args.shapes},
                      launch_table=args.launch_table, super_chunks=args.super_chunks),
    )
    print("measuring ceilings", flush=True)
    result["ceilings"] = ceilings = measure_ceilings(bench)
    print("training shapes", flush=True)
    result["training"] = run_training(args, bench, ceilings)
    result["decode"] = [] if args.no_decode else run_decode(args, bench)
    result["seconds"] = time.time() - started
    print_tables(result)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"\nwrote {args.out} ({result['seconds']:.0f}s)")
    failed = [r for r in result["training"] + result["decode"] if "check" in r and not r["check"]["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
