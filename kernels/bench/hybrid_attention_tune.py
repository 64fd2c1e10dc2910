"""Launch-config sweep of the hybrid attention's Triton kernels, for one GPU call (under 7 minutes).

    python -m kernels.bench.hybrid_attention_tune --out $OUT/hybrid_attention_tune.json   # on the GPU
    python -m kernels.bench.hybrid_attention_tune --dry-run          # CPU: print the grid, time nothing
    python -m kernels.bench.hybrid_attention_tune --emit-table tune.json   # rows for DEFAULT_LAUNCH_CONFIGS

Rows: both model shapes (Llama 3 8B: 32 h, 8 kv, D 128; SmolLM2: 9 h, 3 kv, D 64; F = 128), both
window kinds (window 64), T = 2048 (B = 16) and T = 32768 (B = 1), bf16, chunk 64.

First, per shape, the super-chunk size M (query tiles per program of the state-carrying kernels, the
`super_chunk` of the state_fwd and state_bwd configs; SUPER_CHUNKS or --super-chunks): for each M, the
outputs must match the table's (as below), then forward+backward is timed end to end at every row of
the shape; the M with the lowest mean (time / row's best time) is kept for the rest of the sweep (M
changes which kernels run and how much they do, so it cannot be timed kernel by kernel).
Then, per (shape, window) and per kernel (triton_api.KERNEL_NAMES without decode), every LaunchConfig of
GRID is tried, the table's default first (with the chosen M): the real host functions
(hybrid_attention_fwd/_bwd) run once under `launch_configs(kernel=config)` while `JITFunction.run` is
wrapped to record each launch (and still launch it); y and the six gradients must match the default
config's (RMS ratios of the GPU tests); then the kernel's recorded launches (state_fwd and state_bwd are
two launches each when M > 1: the super-chunk sums and their prefix) alone are timed with
triton.testing.do_bench (median, summed) at both T. The fastest correct config per kernel and row is kept; end to end, forward and
forward+backward (triton_hybrid_attention with those configs, and with the defaults) are timed against
torch SDPA causal (flash backend, GQA) on the same inputs. `--budget-s` stops the sweep (not the end to
end timing) when spent; rows and kernels not reached keep the default config.

Output: a table (rows: shape, window, T; columns: best config per kernel, fwd ms, fwd+bwd ms, speed-ups
over SDPA) and JSON with the device name, every timing, and a "table" entry: per (D, F) block, the
config per kernel with the best mean (time / row's best time) over that shape's rows.
`triton_api.load_launch_table(path)` applies it at run time; `--emit-table` prints it as source.

The prefix kernels work in place (prefix sums over the states or the state gradients), so timing them
alone re-sums their own output: the values grow but the memory traffic, and so the time, do not change.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

import torch

from kernels.hybrid_attention.triton_api import (
    DEFAULT_CHUNK_SIZE,
    KERNEL_NAMES,
    LaunchConfig,
    _Geometry,
    hybrid_attention_bwd,
    hybrid_attention_fwd,
    launch_configs,
    resolve_launch_configs,
    triton_hybrid_attention,
)

from kernels.bench.hybrid_attention_bench import FEATURE_DIM, SHAPES  # the benchmark's shapes, one place

WINDOW_SIZE = 64
WINDOW_KINDS = ("terrace", "sliding")
SEQ_LENS = {2048: 16, 32768: 1}  # T: B
INPUT_NAMES = ("q", "k", "v", "q_feat", "k_feat", "gamma")
OUTPUT_NAMES = ("y", "dq", "dk", "dv", "dq_feat", "dk_feat", "dgamma")
# RMS error / RMS allowed against the default config's outputs (as the GPU tests against fp32).
CHECK_RATIOS = {"y": 1e-2, "dgamma": 5e-2}
CHECK_RATIO = 2e-2
# Kernel function name → triton_api.KERNEL_NAMES entry (the prefix kernel serves both state scans; see
# kernel_name).
KERNEL_OF = {
    "_state_fwd_kernel": "state_fwd", "_state_local_kernel": "state_fwd", "_hybrid_fwd_kernel": "fwd",
    "_bwd_dq_window_kernel": "bwd_dq_window", "_bwd_dq_linear_kernel": "bwd_dq_linear",
    "_state_bwd_kernel": "state_bwd", "_dstate_local_kernel": "state_bwd",
    "_bwd_dkv_linear_kernel": "bwd_dkv_linear", "_bwd_dkv_linear_carry_kernel": "bwd_dkv_linear",
    "_bwd_dkv_window_kernel": "bwd_dkv_window",
}
# Super-chunk sizes tried first, per shape (1 = one tile per program, the per-tile states).
SUPER_CHUNKS = (1, 2, 4, 8)
STATE_KERNELS = ("state_fwd", "state_bwd")  # their configs carry M
# Sweep order: the kernels with the most to gain first (the key-side backward kernels spilled).
TUNED_KERNELS = ("bwd_dkv_window", "bwd_dkv_linear", "fwd", "bwd_dq_window", "bwd_dq_linear", "state_fwd",
                 "state_bwd")


def _grid() -> dict[str, list[LaunchConfig]]:
    """Candidate configs per kernel (the table's default is tried first, in addition)."""
    warps = (4, 8)
    # (num_warps, BFS, BDS) of the state scans: smaller blocks give more programs, larger ones fewer reads.
    state = ((4, 32, 64), (4, 64, 64), (8, 64, 64), (8, 128, 64))
    return dict(
        bwd_dkv_window=[LaunchConfig(num_warps=w, num_stages=1, block_q=q) for w in warps for q in (16, 32, 64)],
        bwd_dkv_linear=[LaunchConfig(num_warps=w, num_stages=1, block_q=q) for w in warps for q in (16, 32, 64)],
        fwd=[LaunchConfig(num_warps=w, num_stages=1) for w in warps],
        bwd_dq_window=[LaunchConfig(num_warps=w, num_stages=1) for w in warps],
        bwd_dq_linear=[LaunchConfig(num_warps=w, num_stages=1, block_f=f) for w in warps for f in (32, 64)],
        state_fwd=[LaunchConfig(num_warps=w, num_stages=3, block_f=f, block_d=d) for w, f, d in state],
        state_bwd=[LaunchConfig(num_warps=w, num_stages=3, block_f=f, block_d=d) for w, f, d in state],
    )


def candidates(kernel: str, head_dim: int, super_chunk: int | None = None) -> list[LaunchConfig]:
    """The default of the table first, then the grid without duplicates; the state scans' configs get
    super_chunk (when given)."""
    default = resolve_launch_configs(head_dim, FEATURE_DIM)[kernel]
    out = []
    for config in [default, *_grid()[kernel]]:
        if kernel in STATE_KERNELS and super_chunk is not None:
            config = dataclasses.replace(config, super_chunk=super_chunk)
        if config not in out:
            out.append(config)
    return out


def with_super_chunk(head_dim: int, super_chunk: int) -> dict[str, LaunchConfig]:
    """Overrides: the table's state_fwd and state_bwd configs with M = super_chunk."""
    row = resolve_launch_configs(head_dim, FEATURE_DIM)
    return {kernel: dataclasses.replace(row[kernel], super_chunk=super_chunk) for kernel in STATE_KERNELS}


def label(config: LaunchConfig) -> str:
    """Short form: w8 s1 q64 f64 d64 m4."""
    parts = [f"w{config.num_warps}", f"s{config.num_stages}"]
    parts += [f"{tag}{value}" for tag, value in (("q", config.block_q), ("f", config.block_f), ("d", config.block_d),
                                                 ("m", config.super_chunk)) if value is not None]
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Device work
# ----------------------------------------------------------------------------------------------


def make_inputs(batch: int, shape: dict, num_tokens: int, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hq, hkv, d = shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"]

    def randn(*size):
        return torch.randn(*size, device="cuda", generator=gen)

    def features():
        x = randn(batch, hq, num_tokens, FEATURE_DIM // 2) * 2
        return torch.cat([x.softmax(-1), (-x).softmax(-1)], dim=-1).to(torch.bfloat16)

    return dict(q=randn(batch, hq, num_tokens, d).bfloat16(), k=randn(batch, hkv, num_tokens, d).bfloat16(),
                v=randn(batch, hkv, num_tokens, d).bfloat16(), q_feat=features(), k_feat=features(),
                gamma=torch.rand(hq, device="cuda", generator=gen) * 0.8 + 0.1,
                dy=randn(batch, hq, num_tokens, d).bfloat16())


@contextlib.contextmanager
def recording():
    """Wrap JITFunction.run so every launch is recorded (kernel, args, kwargs, grid) and still runs (with
    triton_api's direct launch of already-compiled kernels off, which would bypass JITFunction.run)."""
    from triton.runtime.jit import JITFunction

    from kernels.hybrid_attention import triton_api

    launches = []
    original, fast_launch = JITFunction.run, triton_api.FAST_LAUNCH

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, grid))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run, triton_api.FAST_LAUNCH = record, False
    try:
        yield launches
    finally:
        JITFunction.run, triton_api.FAST_LAUNCH = original, fast_launch


def kernel_name(launch) -> str:
    """The KERNEL_NAMES entry a recorded launch belongs to."""
    kernel, _args, kwargs, _grid = launch
    if kernel.__name__ == "_state_prefix_kernel":
        return "state_bwd" if kwargs["REVERSE"] else "state_fwd"
    return KERNEL_OF[kernel.__name__]


def run_pipeline(inputs: dict, window_kind: str, overrides: dict) -> tuple[dict, dict]:
    """Forward + backward host functions under `overrides`. Returns the outputs and, per kernel name,
    its recorded launches, the first of each kernel function and mode (the forward's state scan runs again in
    the backward; both are the same work)."""
    names = ("q", "k", "v", "q_feat", "k_feat", "gamma")
    q, k, v, q_feat, k_feat, gamma = (inputs[n] for n in names)
    with recording() as launches, launch_configs(**overrides):
        geo = _Geometry(q, k, q_feat, WINDOW_SIZE, window_kind, DEFAULT_CHUNK_SIZE)
        y, row_max, arg_max, denom = hybrid_attention_fwd(q, k, v, q_feat, k_feat, gamma, geo)
        grads = hybrid_attention_bwd(inputs["dy"], q, k, v, q_feat, k_feat, gamma, y, row_max, arg_max, denom, geo)
    by_kernel, seen = {}, set()
    for launch in launches:
        # A segmented scan launches its kernel twice (segment sums, then the tiles): both are kept.
        key = (launch[0].__name__, launch[2].get("REVERSE"), launch[2].get("STORE_TILES"))
        if key not in seen:
            seen.add(key)
            by_kernel.setdefault(kernel_name(launch), []).append(launch)
    return dict(zip(OUTPUT_NAMES, (y, *grads))), by_kernel


def mismatches(outputs: dict, reference: dict) -> dict:
    """Outputs whose RMS error against the reference exceeds the allowed ratio: {name: ratio}."""
    bad = {}
    for name, value in outputs.items():
        expected = reference[name].float()
        actual = value.float()
        scale = max(expected.pow(2).mean().sqrt().item(), 1e-6)
        ratio = (actual - expected).pow(2).mean().sqrt().item() / scale if torch.isfinite(actual).all() else 1e9
        if ratio > CHECK_RATIOS.get(name, CHECK_RATIO):
            bad[name] = ratio
    return bad


def time_launches(bench, launches) -> float:
    """Summed median ms of each recorded launch, replayed alone."""
    return sum(bench(lambda: kernel[grid](*args, **kwargs)) for kernel, args, kwargs, grid in launches)


def sdpa_causal(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def time_end_to_end(bench, inputs: dict, window_kind: str, overrides: dict) -> dict:
    """Forward and forward+backward ms of triton_hybrid_attention under `overrides`."""
    tensors = [inputs[n] for n in INPUT_NAMES]
    with launch_configs(**overrides):
        with torch.no_grad():
            fwd = bench(lambda: triton_hybrid_attention(*tensors, WINDOW_SIZE, window_kind))
        leaves = [t.detach().clone().requires_grad_() for t in tensors]

        def step():
            triton_hybrid_attention(*leaves, WINDOW_SIZE, window_kind).backward(inputs["dy"])

        fwd_bwd = bench(step, grad_to_none=leaves)
    return dict(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd)


def time_sdpa(bench, inputs: dict) -> dict:
    q, k, v = (inputs[n] for n in ("q", "k", "v"))
    with torch.no_grad():
        fwd = bench(lambda: sdpa_causal(q, k, v))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def step():
        sdpa_causal(*leaves).backward(inputs["dy"])

    return dict(sdpa_fwd_ms=fwd, sdpa_fwd_bwd_ms=bench(step, grad_to_none=leaves))


# ----------------------------------------------------------------------------------------------
# Sweep, choice, report
# ----------------------------------------------------------------------------------------------


def sweep_super_chunk(args, bench, deadline: float, shape: dict, inputs_by_len: dict,
                      references: dict) -> tuple[int | None, dict]:
    """Per M: outputs checked against the table's at every row, then forward+backward timed end to end.
    Returns the M with the lowest mean (time / row's best) over the rows (None: none timed; keep the
    table's) and {window kind: {T: {label: timings or failure}}}."""
    timings = {}
    for super_chunk in args.super_chunks:
        overrides = with_super_chunk(shape["head_dim"], super_chunk)
        for window_kind in args.window_kinds:
            for t, inputs in inputs_by_len.items():
                if time.time() > deadline:
                    break
                entry = timings.setdefault(window_kind, {}).setdefault(t, {})
                try:
                    outputs, _ = run_pipeline(inputs, window_kind, overrides)
                except Exception as error:  # a config the compiler rejects
                    entry[f"m{super_chunk}"] = dict(failed=f"{type(error).__name__}: {error}"[:200])
                    continue
                bad = mismatches(outputs, references[window_kind][t])
                del outputs
                if bad:
                    entry[f"m{super_chunk}"] = dict(failed=f"mismatch {bad}")
                    continue
                entry[f"m{super_chunk}"] = dict(super_chunk=super_chunk,
                                                **time_end_to_end(bench, inputs, window_kind, overrides))
                torch.cuda.empty_cache()
    rows = [entries for by_len in timings.values() for entries in by_len.values()]
    timed = [{k: v["fwd_bwd_ms"] for k, v in entries.items() if "fwd_bwd_ms" in v} for entries in rows]
    common = set.intersection(*(set(row) for row in timed)) if timed else set()
    if not common:
        return None, timings
    best = min(sorted(common), key=lambda k: sum(row[k] / min(row.values()) for row in timed))
    return int(best[1:]), timings


def sweep(args, bench, deadline: float) -> list[dict]:
    """Per (shape, window, T) row: the super-chunk timings, {config label: ms} per kernel, and the fastest
    correct config."""
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        inputs_by_len = {t: make_inputs(b, shape, t) for t, b in SEQ_LENS.items() if t in args.seq_lens}
        references = {kind: {t: run_pipeline(inputs, kind, {})[0] for t, inputs in inputs_by_len.items()}
                      for kind in args.window_kinds}
        super_chunk, super_timings = sweep_super_chunk(args, bench, deadline, shape, inputs_by_len, references)
        base = with_super_chunk(shape["head_dim"], super_chunk) if super_chunk is not None else {}
        print(f"super-chunk {shape_name}: M = {super_chunk} ({time.time() - args.started:.0f} s)", flush=True)
        for window_kind in args.window_kinds:
            group = [dict(shape=shape_name, window_kind=window_kind, T=t, B=SEQ_LENS[t], kernels={},
                          super_chunk=dict(best=super_chunk, timings=super_timings.get(window_kind, {}).get(t, {})))
                     for t in inputs_by_len]
            for kernel in TUNED_KERNELS:
                for config in candidates(kernel, shape["head_dim"], super_chunk):
                    if time.time() > deadline:
                        break
                    for row, (t, inputs) in zip(group, inputs_by_len.items()):
                        entry = row["kernels"].setdefault(kernel, dict(timings={}, failed={}))
                        try:
                            outputs, launches = run_pipeline(inputs, window_kind, {**base, kernel: config})
                        except Exception as error:  # a config the compiler rejects (e.g. shared memory)
                            entry["failed"][label(config)] = f"{type(error).__name__}: {error}"[:200]
                            continue
                        bad = mismatches(outputs, references[window_kind][t])
                        if bad:
                            entry["failed"][label(config)] = f"mismatch {bad}"
                            continue
                        entry["timings"][label(config)] = dict(ms=time_launches(bench, launches[kernel]),
                                                               config=config.as_dict())
                        del outputs, launches
                    torch.cuda.empty_cache()
            for row in group:
                for entry in row["kernels"].values():
                    if entry["timings"]:
                        best = min(entry["timings"], key=lambda k: entry["timings"][k]["ms"])
                        entry["best"] = best
                        entry["default"] = next(iter(entry["timings"]))
            rows.extend(group)
            print(f"swept {shape_name} {window_kind}: {time.time() - args.started:.0f} s", flush=True)
    return rows


def best_overrides(row: dict) -> dict:
    """The row's fastest config per kernel (the state scans' with the shape's chosen M, also where their
    sweep was not reached)."""
    overrides = {}
    super_chunk = row.get("super_chunk", {}).get("best")
    if super_chunk is not None:
        overrides.update(with_super_chunk(SHAPES[row["shape"]]["head_dim"], super_chunk))
    overrides.update({kernel: LaunchConfig(**entry["timings"][entry["best"]]["config"])
                      for kernel, entry in row["kernels"].items() if "best" in entry})
    return overrides


def choose_table(rows: list[dict]) -> dict:
    """Per shape's (D, F) blocks: per kernel, the config with the lowest mean of time / row's best time
    over the rows where it was timed in all of them."""
    table = {}
    for shape_name, shape in SHAPES.items():
        shape_rows = [r for r in rows if r["shape"] == shape_name]
        if not shape_rows:
            continue
        d_block = 1 << (shape["head_dim"] - 1).bit_length()
        f_block = 1 << (FEATURE_DIM - 1).bit_length()
        kernels = {}
        for kernel in TUNED_KERNELS:
            entries = [r["kernels"].get(kernel, {}) for r in shape_rows]
            if not all(e.get("timings") for e in entries):
                continue
            common = set.intersection(*(set(e["timings"]) for e in entries))
            if not common:
                continue

            def score(name):
                return sum(e["timings"][name]["ms"] / min(x["ms"] for x in e["timings"].values())
                           for e in entries) / len(entries)

            chosen = min(sorted(common), key=score)
            kernels[kernel] = dict(entries[0]["timings"][chosen]["config"])
        super_chunk = shape_rows[0].get("super_chunk", {}).get("best")
        if super_chunk is not None:  # the shape's M also where the state scans' sweep was not reached
            row = resolve_launch_configs(shape["head_dim"], FEATURE_DIM)
            for kernel in STATE_KERNELS:
                kernels.setdefault(kernel, row[kernel].as_dict())["super_chunk"] = super_chunk
        table[f"{d_block},{f_block}"] = kernels
    return table


def print_report(rows: list[dict]) -> None:
    header = (f"{'shape':13} {'window':8} {'T':>6}  {'best config per kernel (default → best, kernel ms)':70} "
              f"{'fwd ms':>7} {'f+b ms':>7} {'x fwd':>6} {'x f+b':>6} {'dflt x fwd':>10} {'dflt x f+b':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        parts = []
        for kernel, entry in r["kernels"].items():
            if "best" in entry:
                ms_default = entry["timings"][entry["default"]]["ms"]
                ms_best = entry["timings"][entry["best"]]["ms"]
                parts.append(f"{kernel}[{entry['best']}] {ms_default:.3f}→{ms_best:.3f}")
        e2e = r.get("end_to_end", {})

        def fmt(key, width):
            value = e2e.get(key)
            return f"{value:>{width}.2f}" if value is not None else " " * (width - 1) + "-"

        super_chunk = r.get("super_chunk", {})
        if super_chunk.get("timings"):
            parts.insert(0, f"M={super_chunk.get('best')} (f+b ms " + ", ".join(
                f"{k}: {v['fwd_bwd_ms']:.3f}" for k, v in super_chunk["timings"].items() if "fwd_bwd_ms" in v) + ")")
        first = True
        for chunk in [parts[i:i + 2] for i in range(0, max(len(parts), 1), 2)] or [[]]:
            text = "; ".join(chunk)
            if first:
                print(f"{r['shape']:13} {r['window_kind']:8} {r['T']:>6}  {text:70} {fmt('fwd_ms', 7)} "
                      f"{fmt('fwd_bwd_ms', 7)} {fmt('speedup_fwd', 6)} {fmt('speedup_fwd_bwd', 6)} "
                      f"{fmt('default_speedup_fwd', 10)} {fmt('default_speedup_fwd_bwd', 10)}")
                first = False
            else:
                print(f"{'':13} {'':8} {'':>6}  {text}")


def emit_table(path: str) -> None:
    """Print the tune JSON's table as rows to paste into triton_api.DEFAULT_LAUNCH_CONFIGS."""
    with open(path) as f:
        table = json.load(f)["table"]
    print("DEFAULT_LAUNCH_CONFIGS: dict[tuple[int, int], dict[str, LaunchConfig]] = {")
    for key, kernels in table.items():
        d_block, f_block = key.split(",")
        print(f"    ({d_block}, {f_block}): _configs(")
        for kernel, config in kernels.items():
            fields = ", ".join(f"{k}={v}" for k, v in config.items())
            print(f"        {kernel}=LaunchConfig({fields}),")
        print("    ),")
    print("}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "hybrid_attention_tune.json"))
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="seconds for the config sweep; the end-to-end timing runs after it (~30 s)")
    parser.add_argument("--rep-ms", type=int, default=25, help="do_bench measuring time per kernel timing (ms)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--window-kinds", nargs="+", choices=WINDOW_KINDS, default=list(WINDOW_KINDS))
    parser.add_argument("--seq-lens", nargs="+", type=int, choices=sorted(SEQ_LENS), default=sorted(SEQ_LENS))
    parser.add_argument("--super-chunks", nargs="+", type=int, default=list(SUPER_CHUNKS),
                        help="super-chunk sizes M tried per shape before the kernel sweep (none: keep the table's)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and the number of configs; no GPU")
    parser.add_argument("--emit-table", metavar="TUNE_JSON", help="print the JSON's table as Python and exit")
    args = parser.parse_args(argv)
    args.started = time.time()

    if args.emit_table:
        emit_table(args.emit_table)
        return
    if args.dry_run:
        total = 0
        for shape_name in args.shapes:
            head_dim = SHAPES[shape_name]["head_dim"]
            table_m = resolve_launch_configs(head_dim, FEATURE_DIM)["state_fwd"].super_chunk or 1
            print(f"{shape_name} (D={head_dim}, F={FEATURE_DIM}): super-chunk sizes {args.super_chunks} end to end, "
                  f"then the kernels at the chosen M (shown with the table's, {table_m}):")
            for kernel in TUNED_KERNELS:
                configs = candidates(kernel, head_dim, table_m)
                total += len(configs) * len(args.window_kinds)
                print(f"  {kernel:15} {len(configs)}: " + " | ".join(label(c) for c in configs))
        rows = len(args.shapes) * len(args.window_kinds) * len(args.seq_lens)
        print(f"{len(args.super_chunks)} super-chunk sizes per shape timed end to end at {rows // len(args.shapes)} "
              f"rows each; {total} compiled configs (per shape and window kind), each timed at {len(args.seq_lens)} "
              f"lengths; {rows} rows; budget {args.budget_s:.0f} s")
        return
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set; unset it to time the compiled kernels")
    if not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run on a CPU")

    import triton
    import triton.testing

    def bench(fn, grad_to_none=None):
        return triton.testing.do_bench(fn, warmup=5, rep=args.rep_ms, grad_to_none=grad_to_none, return_mode="median")

    torch.backends.cuda.matmul.allow_tf32 = False
    rows = sweep(args, bench, deadline=args.started + args.budget_s)

    for row in rows:  # end to end, with the row's best configs and with the defaults, against SDPA
        shape = SHAPES[row["shape"]]
        inputs = make_inputs(row["B"], shape, row["T"])
        e2e = time_end_to_end(bench, inputs, row["window_kind"], best_overrides(row))
        default = time_end_to_end(bench, inputs, row["window_kind"], {})
        e2e.update(time_sdpa(bench, inputs))
        e2e.update(default_fwd_ms=default["fwd_ms"], default_fwd_bwd_ms=default["fwd_bwd_ms"])
        for key in ("fwd", "fwd_bwd"):
            e2e[f"speedup_{key}"] = e2e[f"sdpa_{key}_ms"] / e2e[f"{key}_ms"]
            e2e[f"default_speedup_{key}"] = e2e[f"sdpa_{key}_ms"] / e2e[f"default_{key}_ms"]
        row["end_to_end"] = e2e
        del inputs
        torch.cuda.empty_cache()

    print_report(rows)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(sys.argv), seconds=time.time() - args.started, dtype="bfloat16",
                  window_size=WINDOW_SIZE, chunk_size=DEFAULT_CHUNK_SIZE, feature_dim=FEATURE_DIM,
                  kernel_names=list(KERNEL_NAMES), rows=rows, table=choose_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({time.time() - args.started:.0f} s)")


if __name__ == "__main__":
    main()
