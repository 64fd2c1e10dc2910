"""The `linearize` command line. Each command lives in its own module with `add_arguments(parser)` and
`main(args) -> int`; modules are imported only when their command runs, so `linearize --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). The order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "assets": ("pipeline.assets", "download and convert the real model and data (SmolLM2-135M, ShareGPT, Brown)"),
    "plan": ("pipeline.planner", "choose the block size k from the cost model: GPU memory, cache disk, time"),
    "run": ("pipeline.run", "run the pipeline (plan, collect, transfer, stitch, finetune, export) into a run directory"),
    "resume": ("pipeline.run", "continue a run from whatever its run directory holds"),
    "submit": ("pipeline.jobs", "submit a run to a Ray cluster as a Ray Job"),
    "status": ("pipeline.jobs", "show a submitted job's status"),
    "logs": ("pipeline.jobs", "print (or --follow) a submitted job's log"),
    "convert": ("pipeline.convert", "convert a model (untrained feature maps) and compare it with the teacher and "
                                    "the sliding-window + sinks baseline: per-layer MSE and perplexity"),
    "finetune": ("pipeline.finetune", "stage 2: LoRA on q,k,v,o of the stitched model, DeepSpeed ZeRO-2/3 in Ray "
                                      "workers; resumable, also with another worker count"),
    "export": ("pipeline.export", "write the converted model as a Hugging Face directory (LoRA merged; loads with "
                                  "trust_remote_code; --no-merge keeps the adapter)"),
    "eval": ("pipeline.evaluate", "evaluate a run, an exported model or a preset against the teacher and sliding "
                                  "window + sinks: perplexity by position, zero-shot, passkey, linear mass; gate"),
    "generate": ("pipeline.generate", "generate text from a run or an exported model (--prompt or --chat), streamed"),
    "hyper": ("pipeline.hyper", "patch HyperAttention into chosen layers (training-free) and measure perplexity "
                                "versus the number of patched layers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linearize",
        description="Turn a pretrained Transformer LLM into a sub-quadratic model (LoLCATs hybrid attention, "
                    "HyperAttention), on a laptop or a Ray cluster.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"linearize: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    # Environment the libraries read at import time: CPU DeepSpeed, loopback Ray, no model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    module = importlib.import_module(module_name)
    command_parser = argparse.ArgumentParser(prog=f"linearize {name}", description=help_text)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
