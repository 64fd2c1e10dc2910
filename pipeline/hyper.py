"""`linearize hyper`: perplexity versus the number of final layers patched with HyperAttention.

    linearize hyper                                   # SmolLM2-135M, 4k and 8k, l = 0, 5, ..., 30
    linearize hyper --seq-lens 4096 --num-layers 0 30 --num-sequences 2 --device cpu
    linearize hyper --seq-lens 8192 --each-layer       # perplexity with only layer i patched, every i
    python -m pipeline.hyper ...                        # the same without the console script

For each context length, the same held-out rows (Brown, packed across documents: data.held_out_packed)
are scored with the last l layers patched (blocks.hyper_attention; l = 0 is the exact model).
Perplexity is e-based: exp(total NLL in nats / number of predicted tokens), one number over all rows
(not a mean of per-row perplexities and not 2^NLL, the public code's metric, reference §5.2).
Each patched forward is checked to have really gone through HyperAttention in every patched layer.

Note on min_seq_len: causal blocks of at most min_seq_len tokens are exact, so with the paper's 4096 a
4k context is not approximated at all and 8k only in its off-diagonal half. The default here is 1024
(4k: 2 levels, 25% of the causal area exact; 8k: 3 levels, 12.5%); the table prints both numbers.
Writes JSON (--out) and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

__all__ = ["add_arguments", "main", "sequence_nll"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", default=None,
                        help="Hugging Face model directory (default: SmolLM2-135M-Instruct from `linearize assets`)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192], help="context lengths")
    parser.add_argument("--num-layers", type=int, nargs="+", default=None,
                        help="numbers l of final layers to patch (default: 0, 5, 10, ... up to all)")
    parser.add_argument("--each-layer", action="store_true",
                        help="instead of the last-l sweep, patch one layer at a time (per-layer sensitivity)")
    parser.add_argument("--num-sequences", type=int, default=8, help="held-out rows per context length")
    parser.add_argument("--block-size", type=int, default=256, help="keys per sortLSH block (paper: 256)")
    parser.add_argument("--sample-size", type=int, default=256, help="sampled key columns (paper: 256)")
    parser.add_argument("--lsh-num-projs", type=int, default=7, help="random hyperplanes (paper: 7)")
    parser.add_argument("--min-seq-len", type=int, default=1024,
                        help="exact causal attention at or below this length (paper: 4096; see the module doc)")
    parser.add_argument("--seed", type=int, default=0, help="hash/sample seed (layer i uses seed + i)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU (bf16 is ~26x slower on the CI CPU)")
    parser.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                        help="HyperAttention backend (auto: Triton on CUDA, torch on CPU)")
    parser.add_argument("--out", default="hyper_perplexity.json", help="JSON output path")


@torch.no_grad()
def sequence_nll(model, input_ids: torch.Tensor, chunk: int = 1024) -> tuple[float, int]:
    """(summed next-token NLL in nats, number of predicted tokens) of one (1, T) row.

    The vocabulary projection runs in chunks of positions, in fp32, so an 8k x 49k logits tensor is
    never held at once.
    """
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state  # (1, T, hidden)
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[1] - 1, chunk):
        stop = min(start + chunk, input_ids.shape[1] - 1)
        logits = head(hidden[:, start:stop]).float()
        targets = input_ids[:, start + 1:stop + 1]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total, count


def _causal_exact_share(seq_len: int, min_seq_len: int) -> tuple[int, float]:
    from kernels.hyper_attention import CausalSchedule
    schedule = CausalSchedule.build(seq_len, min_seq_len)
    return schedule.num_levels, 1.0 / (1 << schedule.num_levels)


def main(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blocks.hyper_attention import (HyperAttentionConfig, hyper_patched_layers, patch_hyper_attention,
                                        unpatch_hyper_attention)
    from pipeline.data import held_out_packed

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.model_dir is None:
        from pipeline.assets import ensure_smollm2
        model_dir = ensure_smollm2()
    else:
        model_dir = Path(args.model_dir)
    settings = HyperAttentionConfig(block_size=args.block_size, sample_size=args.sample_size,
                                    lsh_num_projs=args.lsh_num_projs, min_seq_len=args.min_seq_len, seed=args.seed,
                                    backend=args.backend)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                                 local_files_only=True).to(device).eval()
    num_layers = model.config.num_hidden_layers
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and max(args.seq_lens) > max_positions:
        raise ValueError(f"--seq-lens: {max(args.seq_lens)} exceeds the model's max_position_embeddings "
                         f"({max_positions}); choose lengths up to {max_positions}")
    layer_counts = args.num_layers if args.num_layers is not None else sorted({*range(0, num_layers, 5), num_layers})
    for count in layer_counts:
        if not 0 <= count <= num_layers:
            raise ValueError(f"--num-layers: {count} is not in 0..{num_layers} (the model has {num_layers} layers)")
    # Each configuration is the list of patched layer indices; [] is the exact model.
    if args.each_layer:
        configurations = [[]] + [[idx] for idx in range(num_layers)]
    else:
        configurations = [list(range(num_layers - count, num_layers)) for count in layer_counts]
    print(f"model {model_dir} ({num_layers} layers), {device}, {dtype}, {settings}", flush=True)

    rows = []
    started = time.time()
    for seq_len in args.seq_lens:
        tokens = held_out_packed(tokenizer, seq_len, args.num_sequences)
        levels, exact_share = _causal_exact_share(seq_len, args.min_seq_len)
        for patched in configurations:
            count = len(patched)
            unpatch_hyper_attention(model)
            if patched:
                patch_hyper_attention(model, layers=patched, config=settings)
            total, predicted, seconds = 0.0, 0, 0.0
            for row in tokens:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                tick = time.perf_counter()
                nll, num = sequence_nll(model, row[None].to(device))
                seconds += time.perf_counter() - tick
                total, predicted = total + nll, predicted + num
            used = sum(state.num_hyper_calls for state in hyper_patched_layers(model).values())
            if levels and used != count * len(tokens):
                raise RuntimeError(f"HyperAttention ran {used} times, expected {count * len(tokens)} "
                                   f"({count} layers x {len(tokens)} rows); the patch did not take effect")
            result = dict(seq_len=seq_len, num_patched_layers=count, patched_layers=patched,
                          perplexity=math.exp(total / predicted),
                          mean_nll=total / predicted, predicted_tokens=predicted, approximated_levels=levels,
                          exact_causal_share=exact_share, seconds=seconds)
            rows.append(result)
            print(json.dumps(result), flush=True)
    unpatch_hyper_attention(model)

    report = dict(model_dir=str(model_dir), device=str(torch.cuda.get_device_name(device) if device.type == "cuda"
                                                       else "cpu"),
                  dtype=str(dtype), num_sequences=args.num_sequences, settings=dataclasses.asdict(settings), rows=rows,
                  wall_s=time.time() - started, metric="exp(total NLL nats / predicted tokens)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nperplexity (e-based) vs final layers patched with HyperAttention; b={args.block_size} "
          f"m={args.sample_size} r={args.lsh_num_projs} min_seq_len={args.min_seq_len}; {args.num_sequences} rows")
    print(f"{'T':>6} {'levels':>6} {'exact area':>10} {'layers':>8} {'ppl':>9} {'s/row':>7}")
    for row in rows:
        patched = row["patched_layers"]
        label = (f"[{patched[0]}]" if args.each_layer and patched else
                 f"last {row['num_patched_layers']}" if patched else "none")
        print(f"{row['seq_len']:>6} {row['approximated_levels']:>6} {row['exact_causal_share']:>10.3f} "
              f"{label:>8} {row['perplexity']:>9.3f} {row['seconds'] / args.num_sequences:>7.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
