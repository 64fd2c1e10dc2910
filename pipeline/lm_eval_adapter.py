"""lm-evaluation-harness model "linearize": run any harness task on a converted model.

    python -m pipeline.lm_eval_adapter --model_args source=runs/x/export --tasks hellaswag --device cuda

takes the same arguments as `lm_eval` (it is lm_eval's own CLI with `--model linearize` filled in). `lm_eval
--model linearize ...` alone does not work: the harness only knows this model once this module is imported.
From Python: `import pipeline.lm_eval_adapter` and then `lm_eval.simple_evaluate(model="linearize",
model_args={"source": ...}, ...)`, or pass a `LinearizeLM(source=...)` instance as `model`.

model_args: `source` (an exported directory, or a run directory: its export/ if any, else the stitched model
with the stage-2 adapter merged, built in this process; see pipeline/generate.py), `device` (default: cuda if
available), `dtype` (float32 | bfloat16 | float16), `batch_size` (an int, or "auto"); any other HFLM argument
(max_length, add_bos_token, ...) is passed on to HFLM.

LinearizeLM is lm_eval's HFLM given the already-loaded model and tokenizer, so every request type
(loglikelihood, loglikelihood_rolling, generate_until) is HFLM's code. Two things differ, both about padding
and caches:
* loglikelihood: HFLM right-pads a batch and passes no attention mask. That is exact for our models: the
  attention is causal, so padding after a sequence never changes its logits. We only switch the cache off
  (HFLM's forward would otherwise build generation states it never reads).
* generate_until: HFLM left-pads a batch and passes the attention mask. An exported model handles left
  padding itself and makes its constant-size HybridCache in forward(). A model built in process (run
  directory without export/) ignores attention_mask and needs the HybridCache passed in: we pass a fresh one
  per call, and generate each padded row alone, without its padding.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .generate import load_generator


@register_model("linearize")
class LinearizeLM(HFLM):
    """HFLM over `pipeline.generate.load_generator(source, device, dtype)`."""

    def __init__(self, source: str | None = None, device: str | None = None, dtype: str = "float32",
                 batch_size: int | str = 1, **hflm_kwargs):
        if not source:
            raise ValueError(f"source: {source!r} names no model; pass model_args source=RUN_DIR or "
                             "source=EXPORTED_DIR")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        generator = load_generator(str(source), device=device, dtype=dtype)
        super().__init__(pretrained=generator.model, tokenizer=generator.tokenizer, backend="causal",
                         batch_size=batch_size, **hflm_kwargs)
        # None for an exported model (its forward() makes the cache); HybridCache for an in-process one.
        self.new_cache = generator.new_cache
        self.source = generator.source

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits (B, T, V) of right-padded ids (B, T), computed without a generation cache."""
        if attn_mask is not None or labels is not None:
            raise ValueError("attn_mask/labels: only seq2seq models take them; this model is causal")
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(inps, use_cache=False).logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs) -> torch.Tensor:
        """Ids (B, max_length or less): context (B, T), left-padded, followed by its continuation."""
        if self.new_cache is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        mask = generation_kwargs.get("attention_mask")
        if mask is None or bool(mask.all()):
            return super()._model_generate(context, max_length, stop, past_key_values=self.new_cache(),
                                           **generation_kwargs)
        # The in-process model would attend to the padding: generate row by row from the first real token.
        generation_kwargs.pop("attention_mask")
        rows = []
        for ids, row_mask in zip(context, mask):
            start = int((row_mask == 0).sum())
            if not bool(row_mask[start:].all()):
                raise ValueError("attention_mask: expected left padding (zeros before the first real token)")
            out = super()._model_generate(ids[None, start:], max_length - start, stop,
                                          past_key_values=self.new_cache(), **generation_kwargs)
            rows.append(torch.cat([ids[:start], out[0]]))
        # Shorter rows (stopped early) end in pad tokens, as HF generate pads a batch's finished rows.
        width = max(len(row) for row in rows)
        return torch.stack([F.pad(row, (0, width - len(row)), value=self.tokenizer.pad_token_id) for row in rows])


def main(argv: list[str] | None = None) -> None:
    """lm_eval's CLI with `--model linearize` unless another --model is given."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        args = args[1:]
    if not any(arg == "--model" or arg.startswith("--model=") for arg in args):
        args = ["--model", "linearize", *args]
    sys.argv = ["lm_eval", *args]  # lm_eval's parser reads sys.argv (and puts its `run` command first)
    cli_evaluate()


if __name__ == "__main__":
    main()
