"""Stage 1, attention transfer, for one stack of k converted layers (one block).

Each layer is fed the teacher's residual stream (the teacher's attention output continues down the
stream, under no_grad), so the k layers are independent problems; summing their losses and taking one
backward per micro-batch is what the paper does, and a block is just a unit of scheduling. Loss =
mse_scale x mean over layers of MSE(per-head student output, per-head teacher output), before o_proj.
Only feature maps and gamma train (fp32 master weights, AdamW); each block gets its own gradient clip,
plateau LR schedule, early stopping and best-checkpoint selection (lolcats.md §9.8).

No Ray or storage here: the caller feeds batches and persists `state_dict()`; the same trainer runs in
a unit test, in a Ray actor and on a laptop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .convert import freeze_for_transfer
from .hybrid_attention import HybridAttention
from .stack import LayerStack


@dataclass(kw_only=True)
class TransferSettings:
    lr: float = 1e-2
    grad_accum: int = 8
    grad_clip: float = 1.0
    mse_scale: float = 1000.0
    patience: int = 10
    """Evaluations without improvement before early stopping (the plateau LR schedule uses half of it)."""
    min_lr: float = 1e-5


def hybrid_layers(stack: LayerStack) -> list[HybridAttention]:
    mods = [layer.self_attn for layer in stack.layers if isinstance(layer.self_attn, HybridAttention)]
    if not mods:
        raise ValueError("stack: no converted layers; call blocks.convert.convert_layers on stack.layers first")
    return mods


def transfer_loss(stack: LayerStack, hidden: torch.Tensor, position_ids: torch.Tensor,
                  mse_scale: float = 1000.0) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """Run the stack in transfer mode. Returns (loss, per-layer MSE, the teacher's output stream)."""
    modules = hybrid_layers(stack)
    for module in modules:
        module.set_mode("transfer")
    out = stack(hidden, position_ids)
    per_layer = []
    for module in modules:
        student, teacher = module.transfer_outputs
        per_layer.append(F.mse_loss(student.float(), teacher.float()))
        module.transfer_outputs = None  # free the graph references early
    loss = mse_scale * torch.stack(per_layer).mean()
    return loss, [v.item() for v in per_layer], out.detach()


class BlockTrainer:
    """Optimizer, schedule, early stopping and checkpoint state for one block's attention transfer."""

    def __init__(self, stack: LayerStack, settings: TransferSettings):
        self.stack, self.settings = stack, settings
        self.params = freeze_for_transfer(stack)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=0.1, patience=max(settings.patience // 2, 1), min_lr=settings.min_lr)
        self.micro_steps = 0
        self.optimizer_steps = 0
        self.best_loss = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.evals_since_best = 0
        self.history: list[dict] = []

    def train_micro_batch(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """Forward + backward one micro-batch; steps the optimizer every grad_accum micro-batches."""
        self.stack.train()
        loss, per_layer, _ = transfer_loss(self.stack, hidden, position_ids, self.settings.mse_scale)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"attention-transfer loss is {loss.item()} at micro-step {self.micro_steps} "
                                     f"(layers {self.stack.start}..{self.stack.end - 1})")
        (loss / self.settings.grad_accum).backward()
        self.micro_steps += 1
        metrics = {"micro_step": self.micro_steps, "loss": loss.item(), "per_layer_mse": per_layer}
        if self.micro_steps % self.settings.grad_accum == 0:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip).item()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    @torch.no_grad()
    def evaluate(self, batches) -> dict:
        """Mean loss and per-layer MSE over validation batches of (hidden, position_ids); updates the schedule,
        early stopping and the best state."""
        self.stack.eval()
        total, layers, count = 0.0, None, 0
        for hidden, position_ids in batches:
            loss, per_layer, _ = transfer_loss(self.stack, hidden, position_ids, self.settings.mse_scale)
            total += loss.item()
            layers = per_layer if layers is None else [a + b for a, b in zip(layers, per_layer)]
            count += 1
        if count == 0:
            raise ValueError("evaluate: no validation batches")
        result = {"val_loss": total / count, "val_per_layer_mse": [v / count for v in layers],
                  "optimizer_step": self.optimizer_steps}
        self.scheduler.step(result["val_loss"])
        if result["val_loss"] < self.best_loss:
            self.best_loss, self.evals_since_best = result["val_loss"], 0
            self.best_state = self.trainable_state()
        else:
            self.evals_since_best += 1
        result["best_val_loss"] = self.best_loss
        self.history.append(result)
        return result

    @property
    def should_stop(self) -> bool:
        return self.evals_since_best >= self.settings.patience

    def named_trainables(self) -> dict[str, torch.nn.Parameter]:
        """Feature maps and gamma keyed by *global* layer index (layers.N.feature_map_q.weight, ...)."""
        out = {}
        for offset, layer in enumerate(self.stack.layers):
            if isinstance(layer.self_attn, HybridAttention):
                for name, p in layer.self_attn.named_parameters():
                    if name.startswith("feature_map_") or name == "window_logit":
                        out[f"layers.{self.stack.start + offset}.{name}"] = p
        return out

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {key: p.detach().clone() for key, p in self.named_trainables().items()}

    def state_dict(self) -> dict:
        """Everything needed to continue bit-exactly: params, optimizer, schedule, counters, RNG."""
        return {
            "params": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "micro_steps": self.micro_steps,
            "optimizer_steps": self.optimizer_steps,
            "best_loss": self.best_loss,
            "best_state": self.best_state,
            "evals_since_best": self.evals_since_best,
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        current = self.named_trainables()
        missing = set(current) - set(state["params"])
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)[:3]}...; it belongs to another block or model")
        with torch.no_grad():
            for key, p in current.items():
                p.copy_(state["params"][key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps, self.optimizer_steps = state["micro_steps"], state["optimizer_steps"]
        self.best_loss, self.best_state = state["best_loss"], state["best_state"]
        self.evals_since_best, self.history = state["evals_since_best"], list(state["history"])
        torch.set_rng_state(state["torch_rng"])
