"""Measurements shared by the commands: perplexity (overall and by position bucket) and per-layer
attention-transfer MSE. Perplexity is e-based: exp(mean next-token NLL in nats)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from blocks.convert import hybrid_modules, set_attention_mode

DEFAULT_BUCKETS = ((0, 64), (64, 128), (128, 512), (512, 1024), (1024, 2048))


@dataclass
class PerplexityResult:
    nll_sum: float = 0.0
    num_tokens: int = 0
    buckets: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # (start, end) -> [nll sum, count]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / max(self.num_tokens, 1))

    def bucket_perplexity(self) -> dict[str, float]:
        return {f"{a}-{b}": math.exp(s / c) for (a, b), (s, c) in self.buckets.items() if c}

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "tokens": self.num_tokens, "by_position": self.bucket_perplexity()}


@torch.no_grad()
def perplexity(model, sequences: torch.Tensor, batch_size: int = 1, buckets=DEFAULT_BUCKETS,
               desc: str = "perplexity", device: str | torch.device = "cpu") -> PerplexityResult:
    """Next-token NLL over (N, T) token sequences; position p is the position of the predicted token."""
    result = PerplexityResult(buckets={b: [0.0, 0] for b in buckets})
    model.eval()
    for start in tqdm(range(0, len(sequences), batch_size), desc=desc, leave=False):
        ids = sequences[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
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
