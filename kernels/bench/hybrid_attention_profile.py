"""Where the time of one Triton hybrid attention call goes, on the GPU: per-kernel time, idle gaps, host time.

    python -m kernels.bench.hybrid_attention_profile --shape smollm2-135m --seq-lens 2048 32768 \
        [--super-chunks 1 4] [--launch-table TUNE_JSON] [--out profile.json]

hybrid_attention_bench gives end-to-end milliseconds; when they exceed the sum of the kernels the tune run timed
alone, this says why. Per (T, M), for the forward and for forward+backward (the bench's `fn(...).backward(dy)`),
over --steps calls under torch.profiler:
  gpu_span_ms   first kernel start to last kernel end of one call, on the GPU's clock;
  kernel_ms     the sum of the call's kernel durations (the GPU's busy time);
  idle_ms       span − busy: time the GPU waited between kernels (host launch overhead, if large);
  host_ms       the CPU time to enqueue one call (time.perf_counter around it, no synchronisation);
and each kernel's mean duration and launches per call; host_ms_unprofiled, the same without the profiler; the
Python functions with the most host time per forward+backward (cProfile, --host-top). SDPA causal (flash) is profiled alike for comparison.
Prints a table per case and writes JSON with the device named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from kernels.bench.hybrid_attention_bench import (
    INPUT_NAMES,
    SHAPES,
    make_inputs,
    sdpa_causal,
    super_chunk_override,
)
from kernels.hybrid_attention.triton_api import load_launch_table, triton_hybrid_attention


def profile_calls(call, steps: int, device_type: str = "CUDA") -> dict:
    """Run call() `steps` times under the profiler (after warm-up) and split the GPU timeline per call
    (device_type "CPU" profiles CPU ops instead: the test of this function on a machine without a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device_type == "CUDA" else (lambda: None)
    for _ in range(3):
        call()
    sync()
    host = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "CUDA" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            sync()  # each call starts on an idle GPU, so its kernels are its own
            time.sleep(0.005)  # and a 5 ms gap, longer than any inside a call, marks where it starts
            started = time.perf_counter()
            call()
            host.append((time.perf_counter() - started) * 1e3)
            sync()
    kernels = sorted((e for e in prof.events() if e.device_type.name == device_type),
                     key=lambda e: e.time_range.start)
    # The kernels fall into `steps` runs, split at the `steps - 1` largest gaps (the sleeps).
    gaps = sorted(range(1, len(kernels)),
                  key=lambda i: kernels[i].time_range.start - kernels[i - 1].time_range.end)[-(steps - 1):]
    bounds = [0, *sorted(gaps), len(kernels)]
    spans, busy, per_kernel = [], [], {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        run = kernels[a:b]
        spans.append((run[-1].time_range.end - run[0].time_range.start) / 1e3)
        busy.append(sum(e.time_range.end - e.time_range.start for e in run) / 1e3)
        for e in run:
            name = e.name if len(e.name) < 60 else e.name[:57] + "..."
            entry = per_kernel.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += (e.time_range.end - e.time_range.start) / 1e3
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return dict(
        gpu_span_ms=median(spans), kernel_ms=median(busy), idle_ms=median([s - b for s, b in zip(spans, busy)]),
        host_ms=median(host), launches_per_call=(len(kernels) / steps),
        kernels={name: dict(per_call=count / steps, mean_ms=total / count) for name, (count, total) in
                 sorted(per_kernel.items(), key=lambda item: -item[1][1])},
    )


def host_time(call, calls: int = 50) -> float:
    """Median CPU milliseconds to enqueue one call, without the profiler (calls back to back, no sync)."""
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def host_functions(call, calls: int, top: int) -> list[dict]:
    """cProfile of `calls` calls: the `top` Python functions by own time (ms per call)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats
    rows = [dict(function=f"{'/'.join(path.rsplit('/', 2)[-2:])}:{line}:{name}",
                 own_ms=own / calls * 1e3, cumulative_ms=cumulative / calls * 1e3, calls_per_call=count / calls)
            for (path, line, name), (_, count, own, cumulative, _) in stats.items()]
    return sorted(rows, key=lambda r: -r["own_ms"])[:top]


def profile_case(fn, tensors, steps: int, host_top: int = 0) -> dict:
    with torch.no_grad():
        forward = profile_calls(lambda: fn(*tensors), steps)
        forward["host_ms_unprofiled"] = host_time(lambda: fn(*tensors))
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    dy = torch.randn_like(fn(*leaves))

    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).backward(dy)

    backward = profile_calls(step, steps)
    backward["host_ms_unprofiled"] = host_time(step)
    if host_top:
        backward["host_functions"] = host_functions(step, 50, host_top)
    return dict(fwd=forward, fwd_bwd=backward)


def print_case(title: str, case: dict) -> None:
    print(f"\n{title}")
    for key in ("fwd", "fwd_bwd"):
        r = case[key]
        print(f"  {key:8s} span {r['gpu_span_ms']:.3f} ms = kernels {r['kernel_ms']:.3f} + idle {r['idle_ms']:.3f}; "
              f"host {r['host_ms_unprofiled']:.3f} ms ({r['host_ms']:.3f} profiled); {r['launches_per_call']:.0f} "
              f"launches")
        for name, k in r["kernels"].items():
            print(f"      {k['mean_ms'] * k['per_call']:7.3f} ms  {k['per_call']:4.1f}x  {name}")
        for f in r.get("host_functions", []):
            print(f"      host {f['own_ms']:7.4f} ms own, {f['cumulative_ms']:7.4f} cumulative, "
                  f"{f['calls_per_call']:5.1f}x  {f['function']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="B·T per call: B = max(1, tokens // T)")
    parser.add_argument("--window-kind", choices=["sliding", "terrace"], default="sliding")
    parser.add_argument("--super-chunks", nargs="+", type=int, default=[], metavar="M",
                        help="also profile with these super-chunk sizes (the table's row is always profiled)")
    parser.add_argument("--launch-table", metavar="TUNE_JSON", help="apply a tune JSON's table first")
    parser.add_argument("--steps", type=int, default=10, help="profiled calls per case")
    parser.add_argument("--no-sdpa", action="store_true", help="skip the SDPA causal comparison")
    parser.add_argument("--host-top", type=int, default=25,
                        help="list this many Python functions by own host time per forward+backward (cProfile)")
    default_out = os.path.join(os.environ["OUT"], "hybrid_attention_profile.json") if os.environ.get("OUT") else \
        "hybrid_attention_profile.json"
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (run it on the GPU machine)")
    if args.steps < 2:
        parser.error(f"--steps must be at least 2, got {args.steps}")
    if args.launch_table:
        load_launch_table(args.launch_table)
    import triton

    shape = SHAPES[args.shape]
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(),
                  command=" ".join([sys.executable, "-m", "kernels.bench.hybrid_attention_profile", *sys.argv[1:]]),
                  shape=args.shape, window_kind=args.window_kind, launch_table=args.launch_table, cases=[])
    for num_tokens in args.seq_lens:
        batch = max(1, args.tokens // num_tokens)
        inputs = make_inputs(batch, shape, num_tokens)
        tensors = [inputs[n] for n in INPUT_NAMES]
        for super_chunk in [None, *args.super_chunks]:
            with super_chunk_override(shape, super_chunk):
                fn = lambda *t: triton_hybrid_attention(*t, window_size=64, window_kind=args.window_kind)  # noqa: E731
                case = dict(method="triton_hybrid", T=num_tokens, B=batch, super_chunk=super_chunk,
                            **profile_case(fn, tensors, args.steps, args.host_top))
            result["cases"].append(case)
            print_case(f"{args.shape} T={num_tokens} B={batch} {args.window_kind} M={super_chunk or 'table'}", case)
        if not args.no_sdpa:
            case = dict(method="sdpa_causal", T=num_tokens, B=batch, **profile_case(sdpa_causal, tensors[:3],
                                                                                   args.steps))
            result["cases"].append(case)
            print_case(f"{args.shape} T={num_tokens} B={batch} SDPA causal", case)
        del inputs, tensors
        torch.cuda.empty_cache()
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
