"""Host functions, autograd wrapper and public entry points of the Triton hybrid attention.

Layers, as in flash-linear-attention: kernels (triton_chunk.py, triton_decode.py) → host functions
(`hybrid_attention_fwd`, `hybrid_attention_bwd`, `hybrid_decode_step`: allocate, pick tile sizes,
launch) → `HybridAttentionFunction` (autograd) → public functions `triton_hybrid_attention` and
`triton_hybrid_decode_step` (documented shapes, input checks raising ValueError). The public
functions have the signatures and semantics of naive.quadratic_hybrid_attention and
naive.recurrent_hybrid_step, which stay the ground truth and the CPU path.

They run on a CUDA device, or on the CPU under TRITON_INTERPRET=1 (tests; slow, fp32 arithmetic).

Launch settings (num_warps, num_stages, the free tile sizes of each kernel, and the super-chunk size M:
query tiles per program of the kernels that carry the linear state) come from one table,
`DEFAULT_LAUNCH_CONFIGS`, keyed by the (head dim, feature dim) blocks; `launch_configs(...)` overrides
them for the calls made inside it (the tuner, kernels/bench/hybrid_attention_tune.py, uses that), and
`load_launch_table(path)` replaces table rows with the ones a tune run wrote.

Shapes: B batch, Hq query heads, Hkv kv heads (GQA: query head h reads kv head h // (Hq // Hkv)),
T tokens, D head dim, F feature dim, NT = ceil(T / chunk_size) tiles.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os

import torch
import triton
import triton.language as tl

from kernels.hybrid_attention.naive import (
    HybridState,
    check_hybrid_inputs,
    check_state,
    window_start,
)
from kernels.hybrid_attention.triton_chunk import (
    INTERPRET,
    _bwd_dkv_linear_carry_kernel,
    _bwd_dkv_linear_kernel,
    _bwd_dkv_window_kernel,
    _bwd_dq_linear_kernel,
    _bwd_dq_window_kernel,
    _dstate_local_kernel,
    _hybrid_fwd_kernel,
    _state_bwd_kernel,
    _state_fwd_kernel,
    _state_local_kernel,
    _state_prefix_kernel,
    key_span,
)
from kernels.hybrid_attention.triton_decode import _hybrid_decode_kernel

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_LAUNCH_CONFIGS",
    "KERNEL_NAMES",
    "LaunchConfig",
    "launch_configs",
    "load_launch_table",
    "resolve_launch_configs",
    "HybridAttentionFunction",
    "hybrid_attention_bwd",
    "hybrid_attention_fwd",
    "hybrid_decode_step",
    "triton_hybrid_attention",
    "triton_hybrid_decode_step",
]

DEFAULT_CHUNK_SIZE = 64
MAX_HEAD_DIM = 256  # BD × BT register tiles; larger head dims need a D-split the kernels do not have
MAX_FEATURE_DIM = 256
MAX_KEY_SPAN = 32  # key tiles a query tile reads directly (unrolled in the kernels)
MAX_SUPER_CHUNK = 64  # query tiles per program of the state-carrying kernels (a loop, not unrolled)
# The prefix over super-chunk sums: PREFIX_ROWS sums per step (one tl.cumsum), PREFIX_COLUMNS elements of the
# flattened F × D state per program (8 × 512 fp32: 32 registers a thread at 4 warps).
PREFIX_ROWS, PREFIX_COLUMNS = 8, 512
# The per-tile (M = 1) scans are sequential over tiles, one program per (b, h, F × D block): 18 programs at
# B = 1, T = 32k and SmolLM2's 9 heads, 0.5 ms on an H100 for 512 tiles. When those programs do not fill the
# GPU, the tiles are cut into segments: about SCAN_PROGRAMS_PER_SM programs per multiprocessor, and segments
# of at least MIN_SCAN_TILES tiles (the segment sums are an extra pass).
SCAN_PROGRAMS_PER_SM, MIN_SCAN_TILES = 2, 8
LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Launch settings
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Launch settings of one kernel. A tile field a kernel does not have stays None (and is ignored).

    block_q: BQ, query rows per step of the key-side backward kernels (bwd_dkv_linear, bwd_dkv_window).
    block_f: BFS, feature rows per program of the state scans (state_fwd, state_bwd) and per step of the
        state gradient in bwd_dq_linear.
    block_d: BDS, value columns per program of the state scans; BDV, value columns per program of decode.
    super_chunk: M, read from state_fwd and state_bwd only: query tiles per program of the kernels that
        carry the state in registers (state_fwd's M: the forward and bwd_dq_linear, which read S; state_bwd's
        M: bwd_dkv_linear, which reads the state gradients), so states are stored every M tiles; None = 1
        (one stored state per tile, the design before super-chunks).
    scan_tiles: state_fwd and state_bwd at M = 1 only: tiles per program of the per-tile scans, which run in
        segments of that many tiles (segment sums, then each segment from the sum of the others'); None =
        automatic: one segment when the (b, h, F × D block) programs fill the GPU, else enough segments to fill
        it (SCAN_PROGRAMS_PER_SM programs per multiprocessor, segments of at least MIN_SCAN_TILES tiles).
    Tiles larger than the dimension they cut are clamped to it at launch.
    """

    num_warps: int = 8
    num_stages: int = 1
    block_q: int | None = None
    block_f: int | None = None
    block_d: int | None = None
    super_chunk: int | None = None
    scan_tiles: int | None = None

    def __post_init__(self):
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {self.num_stages!r}")
        for name in ("block_q", "block_f", "block_d"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 16 or value & (value - 1)):
                raise ValueError(f"{name} must be None or a power of two >= 16, got {value!r}")
        if self.super_chunk is not None and (isinstance(self.super_chunk, bool) or not isinstance(self.super_chunk, int)
                                             or not 1 <= self.super_chunk <= MAX_SUPER_CHUNK):
            raise ValueError(f"super_chunk must be None or an int in [1, {MAX_SUPER_CHUNK}], got {self.super_chunk!r}")
        if self.scan_tiles is not None and (isinstance(self.scan_tiles, bool) or not isinstance(self.scan_tiles, int)
                                            or self.scan_tiles < 1):
            raise ValueError(f"scan_tiles must be None or an int >= 1, got {self.scan_tiles!r}")

    def as_dict(self) -> dict:
        """The fields that are set (JSON form; LaunchConfig(**d) reads it back)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# The kernels, in launch order (decode separately), as the table and launch_configs(...) name them.
KERNEL_NAMES = ("state_fwd", "fwd", "bwd_dq_window", "bwd_dq_linear", "state_bwd", "bwd_dkv_linear",
                "bwd_dkv_window", "decode")


def _configs(**overrides: LaunchConfig) -> dict[str, LaunchConfig]:
    """A full row of the table: the settings below for every kernel, with `overrides` on top."""
    row = dict(
        state_fwd=LaunchConfig(num_warps=4, num_stages=3, block_f=64, block_d=64),
        fwd=LaunchConfig(num_warps=8, num_stages=1),
        bwd_dq_window=LaunchConfig(num_warps=8, num_stages=1),
        bwd_dq_linear=LaunchConfig(num_warps=8, num_stages=1, block_f=64),
        state_bwd=LaunchConfig(num_warps=4, num_stages=3, block_f=64, block_d=64),
        # A whole tile of query rows per step (BQ = 64) spills less than 32 or 16 (ptxas: 64 / 156 B at
        # D = 128 against 308 / 188 B with BQ = 32; none at D = 64); 4 warps spill 3-4x more.
        bwd_dkv_linear=LaunchConfig(num_warps=8, num_stages=1, block_q=64),
        bwd_dkv_window=LaunchConfig(num_warps=8, num_stages=1, block_q=64),
        # 8 warps: no spills (4 warps spilled 1.2 KB per thread with a terrace window of 64).
        decode=LaunchConfig(num_warps=8, num_stages=3, block_d=64),
    )
    row.update(overrides)
    return row


# Defaults per (head-dim block, feature-dim block) = (next power of two of D, of F). FALLBACK (other shapes)
# comes from the offline ptxas report (kernels/bench/ptxas_report.py: no spills, <= 255 registers); the two
# rows below from an H100 tune run: `python -m kernels.bench.hybrid_attention_tune --emit-table tune.json`
# prints such rows (per (D, F), the config with the best mean time over both window kinds and T = 2k, 32k),
# and `load_launch_table` applies a tune JSON at run time instead.
FALLBACK_LAUNCH_CONFIGS = _configs()
# From kernels/bench/hybrid_attention_tune_h100.json (docs/results.md section 2), which predates super-chunks:
# D = 128 keeps M = 1 (that shape met its targets with per-tile states).
DEFAULT_LAUNCH_CONFIGS: dict[tuple[int, int], dict[str, LaunchConfig]] = {
    (128, 128): _configs(
        bwd_dkv_window=LaunchConfig(num_warps=8, num_stages=1, block_q=64),
        bwd_dkv_linear=LaunchConfig(num_warps=8, num_stages=1, block_q=64),
        fwd=LaunchConfig(num_warps=4, num_stages=1),
        bwd_dq_window=LaunchConfig(num_warps=4, num_stages=1),
        bwd_dq_linear=LaunchConfig(num_warps=4, num_stages=1, block_f=64),
        state_fwd=LaunchConfig(num_warps=4, num_stages=3, block_f=64, block_d=64),
        state_bwd=LaunchConfig(num_warps=4, num_stages=3, block_f=32, block_d=64),
    ),
    # D = 64: the H100 tune of session 3, per-tile states (M = 1). Super-chunks (M > 1) are correct on the GPU
    # since session 5's change to _bwd_dkv_linear_carry_kernel (GPU tests passed on an H200 in session 6:
    # docs/results/gpu_tests_h200_superchunk_session6.log); opt in with launch_configs(state_fwd=..., state_bwd=...)
    # and super_chunk=4. The row stays at M = 1 until the fixed code is timed: session 4's 9.2x SDPA at M = 4
    # (H100, B = 1, T = 32k, forward; kernels/bench/hybrid_attention_bench_superchunk_h100.json) predates the fix.
    # The GPU commands to run next are in TRITON.md, 'Super-chunks on the GPU'.
    (64, 128): _configs(
        bwd_dkv_window=LaunchConfig(num_warps=4, num_stages=1, block_q=64),
        bwd_dkv_linear=LaunchConfig(num_warps=4, num_stages=1, block_q=64),
        fwd=LaunchConfig(num_warps=4, num_stages=1),
        bwd_dq_window=LaunchConfig(num_warps=4, num_stages=1),
        bwd_dq_linear=LaunchConfig(num_warps=4, num_stages=1, block_f=64),
        state_fwd=LaunchConfig(num_warps=4, num_stages=3, block_f=64, block_d=64),
        state_bwd=LaunchConfig(num_warps=8, num_stages=3, block_f=64, block_d=64),
    ),
}

_OVERRIDES: contextvars.ContextVar[dict[str, LaunchConfig]] = contextvars.ContextVar("hybrid_launch_overrides",
                                                                                     default={})


def _check_kernel_names(names) -> None:
    unknown = sorted(set(names) - set(KERNEL_NAMES))
    if unknown:
        raise ValueError(f"unknown kernel name(s) {unknown}; the kernels are {KERNEL_NAMES}")


@contextlib.contextmanager
def launch_configs(**overrides: LaunchConfig):
    """Override the launch settings of the named kernels for every call made inside the block, e.g.

        with launch_configs(bwd_dkv_window=LaunchConfig(num_warps=4, block_q=16)):
            y = triton_hybrid_attention(...)   # the settings are fixed at the forward: the backward of
            y.backward(dy)                     # this y uses them even outside the block

    Nests (inner overrides win); names are those of KERNEL_NAMES.
    """
    _check_kernel_names(overrides)
    for name, config in overrides.items():
        if not isinstance(config, LaunchConfig):
            raise ValueError(f"{name} must be a LaunchConfig, got {type(config).__name__}")
    token = _OVERRIDES.set({**_OVERRIDES.get(), **overrides})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def resolve_launch_configs(head_dim: int, feature_dim: int) -> dict[str, LaunchConfig]:
    """The settings every kernel gets for this (D, F): the table row (or the fallback), then overrides."""
    row = DEFAULT_LAUNCH_CONFIGS.get((_block(head_dim), _block(feature_dim)), FALLBACK_LAUNCH_CONFIGS)
    return {**row, **_OVERRIDES.get()}


def load_launch_table(source) -> dict[tuple[int, int], dict[str, LaunchConfig]]:
    """Replace rows of DEFAULT_LAUNCH_CONFIGS with those of a tune result: a path to the JSON that
    kernels/bench/hybrid_attention_tune.py writes, or its parsed dict. Only its "table" entry is read:
    {"D,F": {kernel: {num_warps, num_stages, block_q, block_f, block_d}}}; kernels missing from a row
    keep the current settings. Returns the rows applied (process-wide; call once at start-up)."""
    if not isinstance(source, dict):
        with open(source) as f:
            source = json.load(f)
    if "table" not in source:
        raise ValueError("source has no 'table' entry; pass the JSON written by kernels.bench.hybrid_attention_tune")
    applied = {}
    for key, kernels in source["table"].items():
        head_block, feature_block = (int(x) for x in key.split(","))
        _check_kernel_names(kernels)
        row = DEFAULT_LAUNCH_CONFIGS.get((head_block, feature_block), FALLBACK_LAUNCH_CONFIGS)
        applied[(head_block, feature_block)] = {**row, **{k: LaunchConfig(**v) for k, v in kernels.items()}}
    DEFAULT_LAUNCH_CONFIGS.update(applied)
    _GEOMETRIES.clear()  # they hold the settings of the old rows
    return applied


# ----------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------

# `kernel[grid](...)` re-derives every argument's specialisation and the cache key on each call: 0.95 of the
# 2.56 ms of host time (under cProfile) of a SmolLM2-shaped forward+backward at B = 16, T = 2048 (9 launches,
# H100 machine, Triton 3.6), whose GPU work is 1.0 ms; the host was the bottleneck (1.5 ms without the profiler:
# `python -m kernels.bench.hybrid_attention_profile`, docs/results.md §2). `_launch` remembers the compiled kernel of each exact
# argument signature (every int and float, each tensor's dtype, device and 16-byte alignment, the constexprs
# and launch options: at least as specific as Triton's own key) and launches it directly afterwards.
# LINEARIZE_TRITON_FAST_LAUNCH=0 goes through kernel[grid](...) every time.
FAST_LAUNCH = not INTERPRET and os.environ.get("LINEARIZE_TRITON_FAST_LAUNCH", "1") != "0"
_COMPILED: dict = {}
_COMPILED_LIMIT = 4096  # signatures kept (each distinct sequence length adds some); cleared when reached
_SIGNATURES: dict = {}


def _constexpr_signature(kernel) -> tuple[int, tuple]:
    """(number of runtime parameters, ((name, default), ...) of the constexpr parameters) of a @triton.jit
    kernel. A compiled kernel takes every parameter positionally, in order, the constexprs included; the
    kernels here declare their constexprs last."""
    signature = _SIGNATURES.get(id(kernel))  # id: a JITFunction's own hash recomputes its source key
    if signature is None:
        params = kernel.params
        num_runtime = sum(not p.is_constexpr for p in params)
        if any(p.is_constexpr for p in params[:num_runtime]):
            raise TypeError(f"{kernel.__name__}: constexpr parameters must come after the runtime ones")
        signature = _SIGNATURES[id(kernel)] = (num_runtime, tuple((p.name, p.default) for p in params[num_runtime:]))
    return signature


_TENSOR_ARGS: dict = {}


def _leading_tensors(kernel, args: tuple) -> int:
    """How many leading arguments of `kernel` are tensors (the kernels here take their pointers first and
    scalars after); -1 when a tensor follows a scalar (then _launch always goes through kernel[grid])."""
    count = _TENSOR_ARGS.get(id(kernel))
    if count is None:
        is_tensor = [isinstance(a, torch.Tensor) for a in args]
        count = is_tensor.index(False) if False in is_tensor else len(args)
        _TENSOR_ARGS[id(kernel)] = count = count if not any(is_tensor[count:]) else -1
    return count


def _signature_key(kernel, args: tuple, constexpr_values: tuple, num_warps: int, num_stages: int):
    """What a compiled kernel depends on: the exact scalars, the tensors' dtypes and device, the constexprs and
    launch options; None (do not reuse) unless every tensor is 16-byte aligned, the case Triton specialises
    for and the only one cached (torch's allocations are)."""
    count = _leading_tensors(kernel, args)
    if count <= 0:
        return None
    tensors = args[:count]
    pointers = 0
    for t in tensors:
        pointers |= t.data_ptr()
    if pointers & 15:
        return None
    return (id(kernel), num_warps, num_stages, constexpr_values, args[count:], tensors[0].device,
            *[t.dtype for t in tensors])


def _launch(kernel, grid, *args, num_warps: int, num_stages: int, **constexprs) -> None:
    """kernel[grid](*args, num_warps=..., num_stages=..., **constexprs), with the compiled kernel reused."""
    if not FAST_LAUNCH:
        kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        return
    num_runtime, constexpr_params = _constexpr_signature(kernel)
    if len(args) != num_runtime:
        raise TypeError(f"{kernel.__name__} takes {num_runtime} runtime arguments, got {len(args)}")
    values = tuple(constexprs[name] if name in constexprs else default for name, default in constexpr_params)
    key = _signature_key(kernel, args, values, num_warps, num_stages)
    compiled = _COMPILED.get(key) if key is not None else None
    if compiled is not None:
        compiled[(*grid, 1, 1)[:3]](*args, *values)  # the compiled kernel's launcher wants three grid sizes
        return
    compiled = kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
    if compiled is not None and key is not None:
        if len(_COMPILED) >= _COMPILED_LIMIT:
            _COMPILED.clear()
        _COMPILED[key] = compiled


# ----------------------------------------------------------------------------------------------
# Launch geometry
# ----------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv is a ConstexprFunction: a few µs a call on the host)."""
    return -(-a // b)


def _block(n: int) -> int:
    """Power-of-two block >= n and >= 16 (tl.dot needs 16)."""
    return max(16, 1 << (n - 1).bit_length())


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a (B, H, T, X) tensor whose last dim is contiguous."""
    strides = t.stride()  # one call: this runs ~30 times per forward+backward, on the host's critical path
    assert strides[-1] == 1 or t.shape[-1] == 1, "callers make the last dim contiguous"
    return strides[:3]


def _unit_last(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t (cast to dtype) with a contiguous last dim and (B, H, T, X) token offsets that fit the kernels' int32
    math. No copy and no torch call beyond one stride() when nothing changes (the usual case, on the host's
    critical path)."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    strides = t.stride()
    if strides[-1] != 1 or (len(strides) == 4 and (t.shape[2] + 128) * strides[2] >= 2**31):
        t = t.contiguous()
        strides = t.stride()
    if len(strides) == 4 and (t.shape[2] + 128) * strides[2] >= 2**31:
        raise ValueError(f"a tensor of shape {tuple(t.shape)} has more than 2^31 elements per (batch, head); "
                         f"split the sequence")
    return t


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached); 1 on the CPU (interpreter), where scans stay unsegmented
    unless scan_tiles asks for segments."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _precision(dtype: torch.dtype) -> str:
    """tl.dot precision of the fp32 × fp32 dots: exact fp32 for fp32 inputs; tf32 next to bf16/fp16."""
    return "ieee" if dtype == torch.float32 or INTERPRET else "tf32"


class _Geometry:
    """Tile sizes and scales shared by the forward and backward launches of one call."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, q_feat: torch.Tensor, window_size: int,
                 window_kind: str, chunk_size: int):
        self.batch, self.num_q_heads, self.num_tokens, self.head_dim = q.shape
        self.num_kv_heads = k.shape[1]
        self.group = self.num_q_heads // self.num_kv_heads
        self.feature_dim = q_feat.shape[-1]
        self.window_size, self.terrace = window_size, window_kind == "terrace"
        self.chunk_size = chunk_size
        self.num_tiles = _cdiv(self.num_tokens, chunk_size)
        self.key_span = key_span(self.num_tiles, chunk_size, window_size, self.terrace)
        self.block_d, self.block_f = _block(self.head_dim), _block(self.feature_dim)
        # Launch settings per kernel, fixed here so that the backward uses those of its forward.
        self.configs = resolve_launch_configs(self.head_dim, self.feature_dim)
        # Super-chunks (tiles per state-carrying program) and stored states, of S (forward and dφq) and of
        # the state gradients (dφk, dv); M = 1 is the per-tile layout (NT states).
        self.super_fwd = self.configs["state_fwd"].super_chunk or 1
        self.super_bwd = self.configs["state_bwd"].super_chunk or 1
        self.num_states_fwd = _cdiv(self.num_tiles, self.super_fwd)
        self.num_states_bwd = _cdiv(self.num_tiles, self.super_bwd)
        self.sm_scale = 1.0 / math.sqrt(self.head_dim)
        self.qk_scale = self.sm_scale * LOG2E
        self.upcast = INTERPRET
        self.precision = _precision(q.dtype)
        self.sm_count = _sm_count(q.device)
        # Dtype of the stored states S, R and of their tl.dot operands (see triton_chunk.py).
        bf16_states = q.dtype == torch.bfloat16 and not INTERPRET
        self.state_dot = tl.bfloat16 if bf16_states else tl.float32
        self.state_dtype = torch.bfloat16 if bf16_states else torch.float32

    def launch(self, kernel: str) -> dict:
        """num_warps and num_stages of a kernel, as launch keyword arguments."""
        config = self.configs[kernel]
        return dict(num_warps=config.num_warps, num_stages=config.num_stages)

    def window_constexprs(self, kernel: str) -> dict:
        """Constexprs and launch settings of the tiled kernels without features."""
        return dict(WINDOW=self.window_size, TERRACE=self.terrace, KSPAN=self.key_span, BT=self.chunk_size,
                    BD=self.block_d, UPCAST=self.upcast, PRECISION=self.precision, **self.launch(kernel))

    def feature_constexprs(self, kernel: str) -> dict:
        """Constexprs and launch settings of the tiled kernels that read features."""
        return dict(self.window_constexprs(kernel), BF=self.block_f, STATE_DOT=self.state_dot)

    def query_rows(self, kernel: str) -> int:
        """BQ of a key-side backward kernel: query rows per step, at most a tile."""
        return min(self.configs[kernel].block_q or 64, self.chunk_size)

    def state_blocks(self, kernel: str) -> tuple[int, int]:
        """(BFS, BDS) of a state scan: the F × D block of one program."""
        config = self.configs[kernel]
        return min(config.block_f or 64, self.block_f), min(config.block_d or 64, self.block_d)

    def dims(self) -> tuple:
        return (self.num_tokens, self.num_tiles, self.num_q_heads, self.group, self.head_dim, self.feature_dim)

    def scan_segments(self, kernel: str) -> tuple[int, int]:
        """(SCAN, NSEG) of a per-tile scan (M = 1; state_fwd or state_bwd): tiles per segment, segments."""
        num_tiles = self.num_tiles
        scan = self.configs[kernel].scan_tiles
        if scan is None:
            block_fs, block_ds = self.state_blocks(kernel)
            programs = (_cdiv(self.feature_dim, block_fs) * _cdiv(self.head_dim, block_ds)
                        * self.batch * self.num_q_heads)
            wanted = _cdiv(SCAN_PROGRAMS_PER_SM * self.sm_count, programs)
            segments = max(1, min(wanted, num_tiles // MIN_SCAN_TILES))
            scan = _cdiv(num_tiles, segments)
        scan = max(1, min(scan, num_tiles))
        return scan, _cdiv(num_tiles, scan)

    def state_grid(self, kernel: str, num_segments: int) -> tuple[int, int, int]:
        """Grid of the per-tile scans (M = 1): one program per F × D block, segment and (b, h)."""
        block_fs, block_ds = self.state_blocks(kernel)
        return (_cdiv(self.feature_dim, block_fs) * _cdiv(self.head_dim, block_ds), num_segments,
                self.batch * self.num_q_heads)

    def local_grid(self, kernel: str, num_states: int) -> tuple[int, int, int]:
        """Grid of the super-chunk sums (M > 1): one program per super-chunk, (b, h) and F × D block."""
        block_fs, block_ds = self.state_blocks(kernel)
        return (num_states, self.batch * self.num_q_heads,
                _cdiv(self.feature_dim, block_fs) * _cdiv(self.head_dim, block_ds))


_GEOMETRIES: dict = {}
_GEOMETRIES_LIMIT = 1024


def _geometry(q: torch.Tensor, k: torch.Tensor, q_feat: torch.Tensor, window_size: int, window_kind: str,
              chunk_size: int) -> _Geometry:
    """_Geometry(...), reused for calls with the same shapes, dtype, device, window and launch settings (its
    construction is a few hundred µs of host time per forward+backward otherwise; it is never modified)."""
    key = (q.shape, k.shape[1], q_feat.shape[-1], q.dtype, q.device, window_size, window_kind, chunk_size,
           tuple(_OVERRIDES.get().items()))
    geo = _GEOMETRIES.get(key)
    if geo is None:
        if len(_GEOMETRIES) >= _GEOMETRIES_LIMIT:
            _GEOMETRIES.clear()
        geo = _GEOMETRIES[key] = _Geometry(q, k, q_feat, window_size, window_kind, chunk_size)
    return geo


# ----------------------------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------------------------


def state_prefix(states: torch.Tensor, sums: torch.Tensor, geo: _Geometry, kernel: str, reverse: bool) -> None:
    """In place: the super-chunk sums (B·Hq, NS, F, D) and (B·Hq, NS, F) become their exclusive prefix sums
    (reverse: suffix sums), with the launch settings of `kernel` (state_fwd or state_bwd)."""
    batch_heads, num_states = states.shape[:2]
    grid = (_cdiv(geo.feature_dim * geo.head_dim, PREFIX_COLUMNS), batch_heads)
    _launch(_state_prefix_kernel, grid,
        states, sums, num_states, geo.head_dim, geo.feature_dim, REVERSE=reverse, CH=PREFIX_ROWS, BE=PREFIX_COLUMNS,
        **geo.launch(kernel),
    )


def hybrid_state_fwd(k_feat: torch.Tensor, v: torch.Tensor, geo: _Geometry,
                     segment_sums: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored linear states S (B·Hq, NS, F, D) in geo.state_dtype and z (B·Hq, NS, F) fp32.
    M = 1: at every tile boundary, S[c] = Σ over keys before tile c of φk vᵀ (a scan over tiles, in
    segments when B·H is small: the segments' sums, then the segments' tiles from the earlier sums).
    segment_sums: a dict that keeps the segments' sums ("sums": (totals, total_sums)) when it has none,
    and supplies them instead of the first pass when it has (the backward's recomputation of the states).
    M > 1: at the super-chunk boundaries, S[g] = Σ over keys before tile i_first(g·M) (the sums over
    each super-chunk's key range in parallel, then their exclusive prefix)."""
    bh, ns, f, d = geo.batch * geo.num_q_heads, geo.num_states_fwd, geo.feature_dim, geo.head_dim
    states = torch.empty(bh, ns, f, d, dtype=geo.state_dtype, device=v.device)
    sums = torch.empty(bh, ns, f, dtype=torch.float32, device=v.device)
    block_fs, block_ds = geo.state_blocks("state_fwd")
    if geo.super_fwd == 1:
        scan, segments = geo.scan_segments("state_fwd")
        grid = geo.state_grid("state_fwd", segments)
        args = (*_strides(k_feat), *_strides(v), geo.num_tokens, geo.num_tiles, scan, segments, geo.num_q_heads,
                geo.group, d, f)
        constexprs = dict(BT=geo.chunk_size, BFS=block_fs, BDS=block_ds, UPCAST=geo.upcast, PRECISION=geo.precision,
                          **geo.launch("state_fwd"))
        totals, total_sums = states, sums  # not read with one segment
        if segments > 1 and segment_sums is not None and "sums" in segment_sums:
            totals, total_sums = segment_sums["sums"]
        elif segments > 1:
            totals = torch.empty(bh, segments, f, d, dtype=torch.float32, device=v.device)
            total_sums = torch.empty(bh, segments, f, dtype=torch.float32, device=v.device)
            _launch(_state_fwd_kernel, grid, k_feat, v, states, sums, totals, total_sums, *args, STORE_TILES=False,
                    LOAD_START=False, **constexprs)
            if segment_sums is not None:
                segment_sums["sums"] = (totals, total_sums)
        _launch(_state_fwd_kernel, grid, k_feat, v, states, sums, totals, total_sums, *args, STORE_TILES=True,
                LOAD_START=segments > 1, **constexprs)
        return states, sums
    t, nt, hq, group = geo.num_tokens, geo.num_tiles, geo.num_q_heads, geo.group
    _launch(_state_local_kernel, geo.local_grid("state_fwd", ns),
        k_feat, v, states, sums, *_strides(k_feat), *_strides(v), t, nt, ns, hq, group, d, f,
        WINDOW=geo.window_size, TERRACE=geo.terrace, SUPER=geo.super_fwd, BT=geo.chunk_size, BFS=block_fs,
        BDS=block_ds, UPCAST=geo.upcast, PRECISION=geo.precision, **geo.launch("state_fwd"),
    )
    state_prefix(states, sums, geo, "state_fwd", reverse=False)
    return states, sums


def hybrid_state_grads(q_feat: torch.Tensor, dy: torch.Tensor, denom: torch.Tensor, delta: torch.Tensor,
                       dstates: torch.Tensor, dsums: torch.Tensor, geo: _Geometry) -> None:
    """M_bwd > 1, into dstates (B·Hq, NS, F, D) in geo.state_dtype and dsums (B·Hq, NS, F) fp32: the state
    gradients at the super-chunk boundaries, R[g] = Σ over query tiles i >= (g + 1)·M of dS_i = φq_iᵀ g_i
    (g = dy / den) and likewise Σ φq_iᵀ h_i (h = −δ / den): each super-chunk's sum in parallel, then their
    exclusive suffix sums. q_feat, dy: (B, Hq, T, ·); denom, delta: (B, Hq, T) fp32."""
    block_fs, block_ds = geo.state_blocks("state_bwd")
    ns = geo.num_states_bwd
    _launch(_dstate_local_kernel, geo.local_grid("state_bwd", ns),
        q_feat, dy, denom, delta, dstates, dsums, *_strides(q_feat), *_strides(dy),
        geo.num_tokens, geo.num_tiles, ns, geo.num_q_heads, geo.head_dim, geo.feature_dim, SUPER=geo.super_bwd,
        BT=geo.chunk_size, BFS=block_fs, BDS=block_ds, UPCAST=geo.upcast, PRECISION=geo.precision,
        STATE_DOT=geo.state_dot, **geo.launch("state_bwd"),
    )
    state_prefix(dstates, dsums, geo, "state_bwd", reverse=True)


def hybrid_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_feat: torch.Tensor, k_feat: torch.Tensor,
    gamma: torch.Tensor, geo: _Geometry, segment_sums: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launch. Inputs share one dtype, last dims contiguous. Returns y (B, Hq, T, D) in q.dtype,
    and for the backward the window max (base 2), its key position (int32) and the full denominator,
    all (B, Hq, T). segment_sums: as in hybrid_state_fwd (a dict given empty keeps the state scan's segment
    sums for the backward, which then skips that pass: one launch fewer, on a host-bound path)."""
    states, sums = hybrid_state_fwd(k_feat, v, geo, segment_sums)
    y = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    row_max = torch.empty(geo.batch, geo.num_q_heads, geo.num_tokens, dtype=torch.float32, device=q.device)
    arg_max = torch.empty(row_max.shape, dtype=torch.int32, device=q.device)
    denom = torch.empty_like(row_max)
    t, nt, hq, group, d, f = geo.dims()
    _launch(_hybrid_fwd_kernel, (geo.num_states_fwd, geo.batch * hq),
        q, k, v, q_feat, k_feat, gamma, states, sums, y, row_max, arg_max, denom,
        *_strides(q), *_strides(k), *_strides(v), *_strides(q_feat), *_strides(k_feat), *_strides(y),
        t, nt, geo.num_states_fwd, hq, group, d, f, geo.qk_scale, SUPER=geo.super_fwd,
        **geo.feature_constexprs("fwd"),
    )
    return y, row_max, arg_max, denom


def hybrid_attention_bwd(
    dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_feat: torch.Tensor,
    k_feat: torch.Tensor, gamma: torch.Tensor, y: torch.Tensor, row_max: torch.Tensor, arg_max: torch.Tensor,
    denom: torch.Tensor, geo: _Geometry, segment_sums: dict | None = None,
) -> tuple[torch.Tensor, ...]:
    """Backward launches, in dependency order (see triton_chunk.py): window dq (also δ, ρ, dγ parts), the
    states (recomputed: cheaper than keeping them), linear dφq (with the per-tile state gradients when
    M_bwd = 1), the reverse prefix sum of the state gradients (M_bwd > 1: super-chunk sums, then their
    suffix sums), linear dφk and dv part, window dk and dv. Returns
    (dq, dk, dv, dq_feat, dk_feat, dgamma) in the dtypes of the inputs."""
    bh, nt, f, d = geo.batch * geo.num_q_heads, geo.num_tiles, geo.feature_dim, geo.head_dim
    bhk = geo.batch * geo.num_kv_heads
    t, group = geo.num_tokens, geo.group

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dgamma_tiles = torch.empty(bh, nt, dtype=torch.float32, device=q.device)
    rho = torch.empty_like(row_max)
    delta = torch.empty_like(row_max)  # dy·y per row
    _launch(_bwd_dq_window_kernel, (nt, bh),
        q, k, v, gamma, y, dy, row_max, arg_max, denom, dq, dgamma_tiles, rho, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(y), *_strides(dy), *_strides(dq),
        t, nt, geo.num_q_heads, group, d, geo.qk_scale, geo.sm_scale, **geo.window_constexprs("bwd_dq_window"),
    )

    states, sums = hybrid_state_fwd(k_feat, v, geo, segment_sums)
    dq_feat = torch.empty(q_feat.shape, dtype=q_feat.dtype, device=q.device)
    # Per-tile state gradients (M_bwd = 1) are written by the dq kernel; with super-chunks it writes none.
    per_tile = geo.super_bwd == 1
    dstates = torch.empty(bh, nt if per_tile else geo.num_states_bwd, f, d, dtype=geo.state_dtype, device=q.device)
    dsums = torch.empty(dstates.shape[:3], dtype=torch.float32, device=q.device)
    _launch(_bwd_dq_linear_kernel, (geo.num_states_fwd, bh),
        v, q_feat, k_feat, states, sums, dy, denom, delta, dq_feat, dstates, dsums,
        *_strides(v), *_strides(q_feat), *_strides(k_feat), *_strides(dy), *_strides(dq_feat),
        t, nt, geo.num_states_fwd, geo.num_q_heads, group, d, f, SUPER=geo.super_fwd, WRITE_DSTATE=per_tile,
        BFS=min(geo.configs["bwd_dq_linear"].block_f or 64, geo.block_f), **geo.feature_constexprs("bwd_dq_linear"),
    )
    del states, sums
    block_fs, block_ds = geo.state_blocks("state_bwd")
    dk_feat = torch.empty(k_feat.shape, dtype=k_feat.dtype, device=k.device)
    if per_tile:
        # In place: dstates[i] <- Σ_{i' >= i} dstates[i'] (in segments as hybrid_state_fwd's scan: the
        # segments' sums, then each segment from the sum of the later segments' sums).
        scan, segments = geo.scan_segments("state_bwd")
        grid = geo.state_grid("state_bwd", segments)
        totals, total_sums = dstates, dsums  # not read with one segment
        if segments > 1:
            totals = torch.empty(bh, segments, f, d, dtype=torch.float32, device=v.device)
            total_sums = torch.empty(bh, segments, f, dtype=torch.float32, device=v.device)
            _launch(_state_bwd_kernel, grid, dstates, dsums, totals, total_sums, nt, scan, segments, d, f,
                    BFS=block_fs, BDS=block_ds, STORE_TILES=False, LOAD_START=False, **geo.launch("state_bwd"))
        _launch(_state_bwd_kernel, grid, dstates, dsums, totals, total_sums, nt, scan, segments, d, f, BFS=block_fs,
                BDS=block_ds, STORE_TILES=True, LOAD_START=segments > 1, **geo.launch("state_bwd"))
        del totals, total_sums
        dv_linear = torch.empty(bhk, t, d, dtype=torch.float32, device=v.device)
        _launch(_bwd_dkv_linear_kernel, (nt, bhk),
            v, q_feat, k_feat, dy, denom, delta, dstates, dsums, dv_linear, dk_feat,
            *_strides(v), *_strides(q_feat), *_strides(k_feat), *_strides(dy), *_strides(dk_feat),
            t, nt, geo.num_q_heads, group, d, f, BQ=geo.query_rows("bwd_dkv_linear"),
            **geo.feature_constexprs("bwd_dkv_linear"),
        )
    else:
        # The super-chunk sums of dS, their suffix sums in place, then the key ranges walked backwards
        # per query head (dv's linear part per query head; the window kernel sums the group).
        ns = geo.num_states_bwd
        hybrid_state_grads(q_feat, dy, denom, delta, dstates, dsums, geo)
        dv_linear = torch.empty(bh, t, d, dtype=torch.float32, device=v.device)
        _launch(_bwd_dkv_linear_carry_kernel, (ns, bh),
            v, q_feat, k_feat, dy, denom, delta, dstates, dsums, dv_linear, dk_feat,
            *_strides(v), *_strides(q_feat), *_strides(k_feat), *_strides(dy), *_strides(dk_feat),
            t, nt, ns, geo.num_q_heads, group, d, f, SUPER=geo.super_bwd, BQ=geo.query_rows("bwd_dkv_linear"),
            **geo.feature_constexprs("bwd_dkv_linear"),
        )
    del dstates, dsums
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _launch(_bwd_dkv_window_kernel, (nt, bhk),
        q, k, v, gamma, dy, row_max, arg_max, denom, delta, rho, dv_linear, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dy), *_strides(dk), *_strides(dv),
        t, nt, geo.num_q_heads, group, d, geo.qk_scale, geo.sm_scale, BQ=geo.query_rows("bwd_dkv_window"),
        DV_PER_HEAD=not per_tile, **geo.window_constexprs("bwd_dkv_window"),
    )
    dgamma = dgamma_tiles.view(geo.batch, geo.num_q_heads, nt).sum(dim=(0, 2))
    if dgamma.dtype != gamma.dtype:
        dgamma = dgamma.to(gamma.dtype)
    return dq, dk, dv, dq_feat, dk_feat, dgamma


class HybridAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton forward/backward (inputs already checked, one dtype, last
    dims contiguous). Saves the inputs, y, the window max, its position and the denominator, and the state
    scan's segment sums when it has segments ((B·Hq, NSEG, F, D) fp32, NSEG ≤ ~30); no T×T or per-tile state
    tensors survive the forward."""

    @staticmethod
    def forward(ctx, q, k, v, q_feat, k_feat, gamma, window_size, window_kind, chunk_size):
        geo = _geometry(q, k, q_feat, window_size, window_kind, chunk_size)
        segment_sums = {}  # the state scan's segment sums, when it has segments (a few MB at most)
        y, row_max, arg_max, denom = hybrid_attention_fwd(q, k, v, q_feat, k_feat, gamma, geo, segment_sums)
        ctx.save_for_backward(q, k, v, q_feat, k_feat, gamma, y, row_max, arg_max, denom)
        ctx.geo, ctx.segment_sums = geo, segment_sums
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, q_feat, k_feat, gamma, y, row_max, arg_max, denom = ctx.saved_tensors
        dy = _unit_last(dy, y.dtype)
        grads = hybrid_attention_bwd(dy, q, k, v, q_feat, k_feat, gamma, y, row_max, arg_max, denom, ctx.geo,
                                     ctx.segment_sums)
        return (*grads, None, None, None)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _check_device(tensors: dict[str, torch.Tensor]) -> torch.device:
    """All tensors on one device, and that device can run the kernels."""
    device = tensors["q"].device
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}; move all inputs to one device")
    if INTERPRET:
        if device.type != "cpu":
            raise ValueError(f"q is on {device}, but TRITON_INTERPRET=1 runs the kernels on the CPU; pass CPU tensors")
    elif device.type != "cuda":
        raise ValueError(
            f"q is on {device}: the Triton hybrid attention needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
            f"tests); on the CPU use quadratic_hybrid_attention or chunked_hybrid_attention"
        )
    return device


def _check_compute_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    dtype = tensors["q"].dtype
    for name, t in tensors.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the Triton kernels take {SUPPORTED_DTYPES} (cast it)")
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_chunk_size(chunk_size: int | None, window_size: int, window_kind: str, num_tokens: int) -> int:
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size > 128
            or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size must be None or a power of two in [16, 128], got {chunk_size!r}")
    num_tiles = _cdiv(num_tokens, chunk_size)
    span = key_span(num_tiles, chunk_size, window_size, window_kind == "terrace")
    if span > MAX_KEY_SPAN:
        raise ValueError(
            f"window_size={window_size} ({window_kind}) spans {span} tiles of chunk_size={chunk_size}, more than "
            f"{MAX_KEY_SPAN}; pass a larger chunk_size (up to 128) or use chunked_hybrid_attention"
        )
    return chunk_size


def triton_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gamma: torch.Tensor,
    window_size: int = 64,
    window_kind: str = "sliding",
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The hybrid attention (softmax window + linear tail, one normalizer) with Triton kernels, O(T).

    Same semantics as `quadratic_hybrid_attention` (gradients flow through the window max c_n, as
    there), differentiable w.r.t. q, k, v, q_feat, k_feat and gamma. fp32 accumulation whatever the
    input dtype; bf16/fp16 operands go to the tensor cores as they are.

    Args:
        q: (B, Hq, T, D) post-RoPE queries; D <= 256.
        k, v: (B, Hkv, T, D) post-RoPE keys and values, Hq % Hkv == 0 (GQA, never repeated in memory).
        q_feat, k_feat: (B, Hq, T, F) feature maps φq(q), φk(repeat_kv(k)), positive; F <= 256.
        gamma: (Hq,) window weight in (0, 1) per query head.
        window_size, window_kind: "sliding" (the window_size latest keys) or "terrace" (previous block
            plus the causal part of the current one, blocks aligned to position 0).
        chunk_size: tokens per tile (power of two in [16, 128]); None = 64. Default: None.
    Returns:
        y: (B, Hq, T, D) in q.dtype.
    """
    check_hybrid_inputs(q, k, v, q_feat, k_feat, gamma, window_size, window_kind)
    tensors = dict(q=q, k=k, v=v, q_feat=q_feat, k_feat=k_feat, gamma=gamma)
    _check_device(tensors)
    compute_dtype = _check_compute_dtype({name: t for name, t in tensors.items() if name != "gamma"})
    if not gamma.is_floating_point():
        raise ValueError(f"gamma must be a floating-point tensor, got dtype {gamma.dtype}")
    head_dim, feature_dim = q.shape[-1], q_feat.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q has head dim D={head_dim}; the Triton kernels support D <= {MAX_HEAD_DIM}")
    if feature_dim > MAX_FEATURE_DIM:
        raise ValueError(f"q_feat has feature dim F={feature_dim}; the Triton kernels support F <= {MAX_FEATURE_DIM}")
    chunk_size = _check_chunk_size(chunk_size, window_size, window_kind, q.shape[2])
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    # One dtype for every tl.dot operand (a no-op in the usual case where all inputs share it).
    q_, k_, v_, q_feat_, k_feat_ = (_unit_last(t, compute_dtype) for t in (q, k, v, q_feat, k_feat))
    y = HybridAttentionFunction.apply(q_, k_, v_, q_feat_, k_feat_, gamma.contiguous(), window_size, window_kind,
                                      chunk_size)
    return y if y.dtype == q.dtype else y.to(q.dtype)


def hybrid_decode_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_feat: torch.Tensor, k_feat: torch.Tensor,
    gamma: torch.Tensor, state: HybridState, window_size: int, window_kind: str, inplace: bool,
) -> tuple[torch.Tensor, HybridState]:
    """Host side of the decode step (inputs checked). Launches the fused kernel, then rebuilds the
    window tensors: [window ‖ new token] without its first `num_evicted` keys."""
    batch, num_q_heads, _, head_dim = q.shape
    num_kv_heads, feature_dim = k.shape[1], q_feat.shape[-1]
    window_length = state.window_length
    # The new token is stored in the window's dtypes, and the math uses the stored values (as naive).
    k = _unit_last(k.to(state.window_k.dtype))
    v = _unit_last(v.to(state.window_v.dtype))
    k_feat = _unit_last(k_feat.to(state.window_k_feat.dtype))
    q, q_feat = _unit_last(q), _unit_last(q_feat)
    next_position = state.num_tokens + 1
    first_in_window = next_position - (window_length + 1)
    num_evicted = max(0, max(0, window_start(next_position, window_size, window_kind)) - first_in_window)

    kv = state.kv.contiguous()
    k_sum = state.k_sum.contiguous()
    # An empty window has no storage to point at; the kernel masks it out, so any tensor will do.
    window_k = _unit_last(state.window_k) if window_length else k
    window_v = _unit_last(state.window_v) if window_length else v
    window_k_feat = _unit_last(state.window_k_feat) if window_length else k_feat
    y = torch.empty(batch, num_q_heads, 1, head_dim, dtype=q.dtype, device=q.device)
    kv_out = kv if inplace else torch.empty_like(kv)
    k_sum_out = torch.empty_like(k_sum)
    capacity = window_size if window_kind == "sliding" else 2 * window_size
    block_d = _block(head_dim)
    config = resolve_launch_configs(head_dim, feature_dim)["decode"]
    block_dv = min(config.block_d or 64, block_d)
    precision = _precision(state.window_k.dtype)
    grid = (batch * num_q_heads, _cdiv(head_dim, block_dv))
    _launch(_hybrid_decode_kernel, grid,
        q, k, v, q_feat, k_feat, gamma, window_k, window_v, window_k_feat, kv, k_sum, y, kv_out, k_sum_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_feat.stride(0), q_feat.stride(1), k_feat.stride(0), k_feat.stride(1),
        *_strides(window_k), *_strides(window_v), *_strides(window_k_feat), y.stride(0), y.stride(1),
        window_length, num_evicted, num_q_heads, num_q_heads // num_kv_heads, head_dim, feature_dim,
        LOG2E / math.sqrt(head_dim),
        BW=_block(capacity), BD=block_d, BDV=block_dv, BF=_block(feature_dim), PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    new_state = HybridState(
        kv=kv_out,
        k_sum=k_sum_out,
        window_k=torch.cat([state.window_k, k], dim=2)[:, :, num_evicted:],
        window_v=torch.cat([state.window_v, v], dim=2)[:, :, num_evicted:],
        window_k_feat=torch.cat([state.window_k_feat, k_feat], dim=2)[:, :, num_evicted:],
        num_tokens=next_position,
    )
    return y, new_state


def triton_hybrid_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    gamma: torch.Tensor,
    state: HybridState,
    window_size: int = 64,
    window_kind: str = "sliding",
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, HybridState]:
    """One decoding step for the token at position state.num_tokens of every sequence in the batch,
    fused in one kernel (window attention + linear part + folding evicted keys into the state).

    Same semantics as `recurrent_hybrid_step`; the cost does not depend on the context length.

    Args:
        q: (B, Hq, 1, D); k, v: (B, Hkv, 1, D); q_feat, k_feat: (B, Hq, 1, F); gamma: (Hq,).
        state: the HybridState after the previous tokens (from prefill_hybrid_state,
            empty_hybrid_state or an earlier step), on the device of q.
        window_size, window_kind: as in training and prefill.
        inplace: write the new kv into state.kv (when it is contiguous) instead of a new tensor; the
            input state must not be used afterwards. Default: False.
    Returns:
        y: (B, Hq, 1, D) in q.dtype, and the new HybridState.
    """
    batch, num_q_heads, num_kv_heads, num_tokens, head_dim, feature_dim = check_hybrid_inputs(
        q, k, v, q_feat, k_feat, gamma, window_size, window_kind
    )
    if num_tokens != 1:
        raise ValueError(f"q must be (B, Hq, 1, D): one token per step, got {tuple(q.shape)}")
    if not isinstance(state, HybridState):
        raise ValueError(f"state must be a HybridState, got {type(state).__name__}")
    check_state(state, batch, num_q_heads, num_kv_heads, head_dim, feature_dim)
    window_length = state.window_length
    capacity = window_size if window_kind == "sliding" else 2 * window_size
    if window_length + 1 > capacity:
        raise ValueError(
            f"state holds {window_length} window keys, but a {window_kind} window of window_size={window_size} "
            f"holds at most {capacity - 1} between steps; was the state built with another window?"
        )
    tensors = dict(q=q, k=k, v=v, q_feat=q_feat, k_feat=k_feat, gamma=gamma, **{
        f"state.{name}": getattr(state, name) for name in ("kv", "k_sum", "window_k", "window_v", "window_k_feat")})
    _check_device(tensors)
    _check_compute_dtype({name: t for name, t in tensors.items() if name not in ("gamma",)})
    if head_dim > MAX_HEAD_DIM or feature_dim > MAX_FEATURE_DIM:
        raise ValueError(f"q: D={head_dim} and F={feature_dim} must be <= {MAX_HEAD_DIM} and {MAX_FEATURE_DIM}")
    return hybrid_decode_step(q, k, v, q_feat, k_feat, gamma.contiguous(), state, window_size, window_kind, inplace)
