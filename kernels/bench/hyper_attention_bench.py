"""GPU benchmark of one HyperAttention layer forward against exact torch SDPA, with its error.

    python -m kernels.bench.hyper_attention_bench --out bench.json            # full table, 4k..131k
    python -m kernels.bench.hyper_attention_bench --seq-lens 4096 16384 --tune

Order of work (benchmarks must pass their checks first): (1) correctness on the device: the Triton
forward equals the torch path for the same plan, and with one LSH block and no samples it equals
SDPA; the script stops if either fails; (2) optional tile tuning at one size; (3) for every mode
(causal, non-causal), head dim and length: the exact SDPA output first, then HyperAttention's, the
relative error ||y_hyper - y_exact||_F / ||y_exact||_F, then both timed with triton.testing.do_bench
(median). HyperAttention's time includes drawing the plan, hashing, sorting and every launch.
Errors are measured on two synthetic inputs (i.i.d. Gaussian: diffuse attention, the worst case for
the sampled residual; clustered: peaked attention), neither of which is LLM attention; timings use
the Gaussian ones. Prints a table last and writes JSON with the device name.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

from kernels.hyper_attention import draw_plan, hyper_attention
from kernels.hyper_attention.torch_path import hyper_attention_torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def make_inputs(batch, heads, seq_len, head_dim, dtype, seed, kind="gaussian", num_clusters=64):
    """q, k, v (B, H, T, D). "gaussian": i.i.d. N(0, 1), diffuse attention. "clustered": q and k near one of
    num_clusters directions of norm sqrt(D) (logit ~ sqrt(D) within a cluster, ~0 across): peaked attention
    with heavy entries for sortLSH to find, closer to what trained attention heads do."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, heads, seq_len, head_dim)
    v = torch.randn(shape, device="cuda", generator=g).to(dtype)
    if kind == "gaussian":
        return [torch.randn(shape, device="cuda", generator=g).to(dtype) for _ in range(2)] + [v]
    centers = torch.nn.functional.normalize(torch.randn(num_clusters, head_dim, device="cuda", generator=g), dim=-1)
    centers = centers * math.sqrt(head_dim)

    def near_centers():
        idx = torch.randint(0, num_clusters, shape[:3], device="cuda", generator=g)
        return (centers[idx] + 0.5 * torch.randn(shape, device="cuda", generator=g)).to(dtype)
    return [near_centers(), near_centers(), v]


def hyper_runner(args, causal, tiles=None):
    """A closure running the whole HyperAttention forward (plan + hash + sort + kernels) with given tiles."""
    from kernels.hyper_attention.triton_fwd import hyper_attention_triton_fwd

    def run(q, k, v):
        plan = draw_plan(q, k, causal=causal, block_size=args.block_size, sample_size=args.sample_size,
                         lsh_num_projs=args.lsh_num_projs, min_seq_len=args.min_seq_len, seed=0, generator=None)
        out, _ = hyper_attention_triton_fwd(q, k, v, plan, causal=causal, scale=q.shape[-1] ** -0.5,
                                            block_size=args.block_size, tiles=tiles)
        return out.to(q.dtype)
    return run


def sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def check_correctness(args, dtype) -> list[dict]:
    """Triton == torch path (same plan) and exact settings == SDPA, on the device. Raises on failure."""
    rows = []
    for head_dim in args.head_dims:
        for causal in args.modes:
            q, k, v = make_inputs(1, 4, 8192, head_dim, dtype, seed=1)
            settings = dict(causal=causal, block_size=args.block_size, sample_size=args.sample_size,
                            lsh_num_projs=args.lsh_num_projs, min_seq_len=2048, seed=3)
            fast = hyper_attention(q, k, v, backend="triton", **settings)
            plan = draw_plan(q, k, generator=None, **settings)
            reference, _ = hyper_attention_torch(q, k, v, plan, causal=causal, scale=head_dim ** -0.5,
                                                 block_size=args.block_size)
            exact_settings = {**settings, "block_size": 8192, "sample_size": 0}
            exact_fast = hyper_attention(q, k, v, backend="triton", **exact_settings)
            row = dict(head_dim=head_dim, causal=causal, triton_vs_torch=rel_error(fast, reference),
                       exact_settings_vs_sdpa=rel_error(exact_fast, sdpa(q, k, v, causal)))
            rows.append(row)
            print(f"check d={head_dim} causal={causal}: triton vs torch path {row['triton_vs_torch']:.2e}, "
                  f"exact settings vs SDPA {row['exact_settings_vs_sdpa']:.2e}", flush=True)
            if row["triton_vs_torch"] > 2e-2 or row["exact_settings_vs_sdpa"] > 2e-2:
                raise SystemExit(f"correctness check failed: {row}")
    return rows


def tune(args, dtype, bench) -> dict[int, dict]:
    """Best tile config per head dim, timed on causal HyperAttention at --tune-len."""
    candidates = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
                  for bm, bn, w, s in [(128, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2),
                                       (128, 64, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2)]]
    best = {}
    for head_dim in args.head_dims:
        q, k, v = make_inputs(args.batch, args.heads, args.tune_len, head_dim, dtype, seed=2)
        timings = []
        for tiles in candidates:
            try:
                ms = bench(lambda: hyper_runner(args, True, tiles)(q, k, v))
            except Exception as error:  # e.g. out of shared memory for a large tile
                print(f"tune d={head_dim} {tiles}: failed ({type(error).__name__})", flush=True)
                continue
            timings.append((ms, tiles))
            print(f"tune d={head_dim} {tiles}: {ms:.3f} ms", flush=True)
        best[head_dim] = min(timings, key=lambda item: item[0])[1]
        print(f"tune d={head_dim}: best {best[head_dim]}", flush=True)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--modes", nargs="+", default=["causal", "noncausal"], choices=["causal", "noncausal"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--sample-size", type=int, default=256)
    parser.add_argument("--lsh-num-projs", type=int, default=7)
    parser.add_argument("--min-seq-len", type=int, default=4096)
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per case (ms)")
    parser.add_argument("--tune", action="store_true", help="pick Triton tiles per head dim before timing")
    parser.add_argument("--tune-len", type=int, default=32768)
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--out", default="hyper_attention_bench.json", help="JSON output path")
    args = parser.parse_args(argv)
    args.modes = [mode == "causal" for mode in args.modes]
    if not torch.cuda.is_available():
        print("hyper_attention_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    import triton.testing

    dtype = DTYPES[args.dtype]

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median")

    started = time.time()
    checks = [] if args.skip_checks else check_correctness(args, dtype)
    tiles = tune(args, dtype, bench) if args.tune else {}
    rows = []
    for causal in args.modes:
        for head_dim in args.head_dims:
            run = hyper_runner(args, causal, tiles.get(head_dim))
            for seq_len in args.seq_lens:
                errors = {}
                for kind in ("clustered", "gaussian"):  # the gaussian inputs stay for the timing
                    q, k, v = make_inputs(args.batch, args.heads, seq_len, head_dim, dtype, seed=seq_len, kind=kind)
                    exact_out = sdpa(q, k, v, causal)  # exact first
                    errors[kind] = rel_error(run(q, k, v), exact_out)
                    del exact_out
                exact_ms = bench(lambda: sdpa(q, k, v, causal))
                hyper_ms = bench(lambda: run(q, k, v))
                levels = 0
                if causal:
                    while -(-seq_len // (1 << levels)) > args.min_seq_len:
                        levels += 1
                row = dict(causal=causal, head_dim=head_dim, seq_len=seq_len, exact_ms=exact_ms, hyper_ms=hyper_ms,
                           speedup=exact_ms / hyper_ms, rel_error=errors["gaussian"],
                           rel_error_clustered=errors["clustered"], approximated_levels=levels,
                           approximated=seq_len > args.min_seq_len)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del q, k, v
                torch.cuda.empty_cache()

    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), dtype=args.dtype, batch=args.batch, heads=args.heads,
                  block_size=args.block_size, sample_size=args.sample_size, lsh_num_projs=args.lsh_num_projs,
                  min_seq_len=args.min_seq_len, tiles={str(d): t for d, t in tiles.items()}, checks=checks, rows=rows,
                  wall_s=time.time() - started)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)

    print(f"\n{result['device']}, {args.dtype}, batch {args.batch}, {args.heads} heads, b={args.block_size} "
          f"m={args.sample_size} r={args.lsh_num_projs} min_seq_len={args.min_seq_len}; median ms (do_bench)")
    print("rel err = ||y_hyper - y_sdpa||_F / ||y_sdpa||_F on gaussian / clustered inputs (see make_inputs)")
    print(f"{'mode':>9} {'d':>4} {'T':>7} {'SDPA ms':>9} {'hyper ms':>9} {'speedup':>8} {'err gauss':>10} "
          f"{'err clust':>10}")
    for row in rows:
        print(f"{'causal' if row['causal'] else 'noncausal':>9} {row['head_dim']:>4} {row['seq_len']:>7} "
              f"{row['exact_ms']:>9.3f} {row['hyper_ms']:>9.3f} {row['speedup']:>8.2f} {row['rel_error']:>10.3f} "
              f"{row['rel_error_clustered']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
