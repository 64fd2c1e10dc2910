"""`linearize convert`: convert every attention layer of a model to the hybrid (untrained feature maps)
and print the first honest numbers on held-out text (Brown corpus):

  * per-layer MSE between student and teacher attention outputs (per head, before o_proj; each layer
    fed the teacher's residual stream, as in stage 1);
  * perplexity of the teacher, of the converted-untrained model, and of the training-free baseline any
    trained conversion must beat: sliding-window softmax (64) with 4 sink tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from blocks.convert import AttentionSettings, convert_model, hybrid_state_dict, set_attention_mode
from blocks.window_attention import restore_attention, swap_to_sliding_window

from .config import WINDOW_KINDS, load_model_config
from .evaluate import perplexity, per_layer_mse


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model preset or YAML path (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=1024, help="held-out sequence length (default: %(default)s)")
    parser.add_argument("--sequences", type=int, default=8, help="number of held-out sequences (default: %(default)s)")
    parser.add_argument("--window-size", type=int, default=64, help="softmax window (default: %(default)s)")
    parser.add_argument("--window-kind", choices=WINDOW_KINDS, default="terrace", help="default: %(default)s")
    parser.add_argument("--feature-dim", type=int, default=64, help="Hedgehog f (2f features; default %(default)s)")
    parser.add_argument("--sinks", type=int, default=4, help="sink tokens of the SWA baseline (default: %(default)s)")
    parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    parser.add_argument("--save", help="save the (untrained) feature maps and gamma to this safetensors file")


def run(model_name: str, seq_len: int, num_sequences: int, settings: AttentionSettings, num_sinks: int = 4,
        device: str = "cpu") -> dict:
    from .data import held_out_sequences
    from .models import load_model, load_tokenizer

    model_cfg = load_model_config(model_name)
    started = time.time()
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, dtype=torch.float32, device=device)
    sequences = held_out_sequences(tokenizer, seq_len, num_sequences)
    results = {"model": model_cfg.name, "seq_len": seq_len, "sequences": len(sequences),
               "held_out": "Brown corpus (one sequence per document, from its start)",
               "window": f"{settings.window_kind}:{settings.window_size}", "feature_dim": settings.feature_dim}

    results["teacher"] = perplexity(model, sequences, desc="teacher", device=device).to_dict()
    swap_to_sliding_window(model, window_size=settings.window_size, num_sinks=num_sinks)
    results[f"swa{settings.window_size}+{num_sinks}sinks"] = perplexity(
        model, sequences, desc="sliding window + sinks", device=device).to_dict()
    restore_attention(model)

    convert_model(model, settings)
    mse = per_layer_mse(model, sequences, device=device)
    results["per_layer_mse"] = {str(k): v for k, v in mse.items()}
    set_attention_mode(model, "student")
    results["converted_untrained"] = perplexity(model, sequences, desc="converted (untrained)",
                                                device=device).to_dict()
    results["seconds"] = round(time.time() - started, 1)
    results["_model"] = model
    return results


def print_report(results: dict) -> None:
    print(f"\nmodel {results['model']}: {results['sequences']} held-out sequences x {results['seq_len']} tokens "
          f"({results['held_out']}); hybrid window {results['window']}, feature dim {results['feature_dim']}")
    print("\nper-layer attention-output MSE, student vs teacher (untrained feature maps; stage-1 loss = 1000 x MSE)")
    print(f"{'layer':>5}  {'MSE':>10}  {'1000xMSE':>9}")
    for layer, value in results["per_layer_mse"].items():
        print(f"{layer:>5}  {value:10.3e}  {1000 * value:9.3f}")
    values = list(results["per_layer_mse"].values())
    print(f"{'mean':>5}  {sum(values) / len(values):10.3e}  {1000 * sum(values) / len(values):9.3f}")
    print("\nperplexity (e-based) on the held-out sequences")
    rows = [(k, v) for k, v in results.items() if isinstance(v, dict) and "perplexity" in v]
    teacher = results["teacher"]["perplexity"]
    buckets = list(results["teacher"]["by_position"])
    print(f"{'model':<22} {'ppl':>9} {'x teacher':>9}  " + "  ".join(f"{b:>10}" for b in buckets))
    for name, value in rows:
        cells = "  ".join(f"{value['by_position'].get(b, float('nan')):10.2f}" for b in buckets)
        print(f"{name:<22} {value['perplexity']:9.2f} {value['perplexity'] / teacher:9.2f}  {cells}")
    print(f"\n({results['seconds']} s)")


def main(args) -> int:
    settings = AttentionSettings(window_size=args.window_size, window_kind=args.window_kind,
                                 feature_dim=args.feature_dim)
    results = run(args.model, args.seq_len, args.sequences, settings, num_sinks=args.sinks)
    model = results.pop("_model")
    print_report(results)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json_path}")
    if args.save:
        from safetensors.torch import save_file
        save_file(hybrid_state_dict(model), args.save)
        print(f"saved feature maps and gamma to {args.save}")
    return 0
