"""`linearize generate SOURCE (--prompt TEXT | --chat)`: text from a converted model, streamed as it decodes.

SOURCE is an exported directory (`linearize export`; loaded with trust_remote_code, as any user would) or
a run directory: its export/ if there is one, else the stitched model with the stage-2 adapter merged, built
in this process. Either way decoding uses the constant-size hybrid cache. `--chat` renders the conversation
with the tokenizer's chat template each turn (one line of input per user turn; an empty line or EOF ends it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .rundir import RunDir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Generator:
    """A model ready for generate(), its tokenizer, and the cache factory it needs (None: the model makes it)."""

    model: torch.nn.Module
    tokenizer: object
    new_cache: Callable[[], object] | None
    source: str

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, streamer=None,
                 **kwargs) -> torch.Tensor:
        """Token ids (prompt + continuation); greedy when temperature is 0."""
        device = next(self.model.parameters()).device
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False}
        if self.new_cache is not None:
            kwargs["past_key_values"] = self.new_cache()
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(device)
        pad_id = self.tokenizer.pad_token_id
        with torch.no_grad():
            return self.model.generate(input_ids.to(device), max_new_tokens=max_new_tokens, streamer=streamer,
                                       pad_token_id=self.tokenizer.eos_token_id if pad_id is None else pad_id,
                                       **sampling, **kwargs)


def is_export_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.exists() and "hybrid_attention" in json.loads(config.read_text())


def load_generator(source: str, device: str = "cpu", dtype: str = "float32") -> Generator:
    """An exported directory, or a run directory (its export/, else the stitched model + merged adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    path = Path(source)
    if not is_export_dir(path):
        run = RunDir(source)
        export = Path(run.path(RunDir.export_dir))
        if run.fs.exists(run.path(RunDir.export_dir, "config.json")) and export.exists() and is_export_dir(export):
            path = export
        elif run.exists("stitched/stitched.json"):
            return _in_process(run, device, DTYPES[dtype])
        else:
            raise ValueError(f"source: {source!r} is neither an exported model directory (config.json with "
                             "hybrid_attention) nor a run directory with stitched/; run `linearize export` or "
                             "the stitch stage first")
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    return Generator(model.to(device).eval(), tokenizer, None, str(path))


def _in_process(run: RunDir, device: str, dtype: torch.dtype) -> Generator:
    from blocks.hybrid_attention import HybridCache

    from .export import merge_run_adapter
    from .finetune import load_stitched
    from .models import load_tokenizer

    stitched = load_stitched(run)
    model = merge_run_adapter(run, stitched.model) or stitched.model
    tokenizer = load_tokenizer(stitched.model_config)
    return Generator(model.to(device=device, dtype=dtype).eval(), tokenizer, HybridCache, run.url)


def _encode(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def chat(generator: Generator, lines, **generate_kwargs) -> list[dict]:
    """Read user turns from `lines` until an empty one; stream each reply to stdout. Returns the conversation."""
    from transformers import TextStreamer

    tokenizer = generator.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{generator.source}: the tokenizer has no chat template; use --prompt instead of --chat")
    messages: list[dict] = []
    for line in lines:
        text = line.rstrip("\n")
        if not text:
            break
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        input_ids = _encode(tokenizer, prompt)
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        output = generator.generate(input_ids, streamer=streamer, **generate_kwargs)
        reply = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
    return messages


def add_arguments(parser) -> None:
    parser.add_argument("source", help="exported model directory, or run directory")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue")
    what.add_argument("--chat", action="store_true", help="chat on stdin with the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling when temperature > 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def main(args) -> int:
    from transformers import TextStreamer

    torch.manual_seed(args.seed)
    generator = load_generator(args.source, device=args.device, dtype=args.dtype)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.chat:
        print("chat: one line per turn; an empty line ends the conversation", file=sys.stderr)
        chat(generator, sys.stdin, **settings)
        return 0
    input_ids = _encode(generator.tokenizer, args.prompt)
    print(args.prompt, end="", flush=True)
    generator.generate(input_ids, streamer=TextStreamer(generator.tokenizer, skip_prompt=True,
                                                        skip_special_tokens=True), **settings)
    return 0
