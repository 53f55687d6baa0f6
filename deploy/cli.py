"""The `tandem` command line.

    tandem generate --offline [--model PATH] [--prompt TEXT | --chat TEXT]... [--max-tokens N]
                    [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S] [--json]

All prompts (`--prompt` and `--chat` may repeat and mix) run together as one
batch. With --json, one JSON object per prompt per line, in the order given.
Errors in the input print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engine.errors import EngineError

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


class _Ordered(argparse.Action):
    """Collects --prompt and --chat into one list, keeping their order."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, "inputs", None) or []
        items.append((self.dest, values))
        namespace.inputs = items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate completions")
    g.add_argument("--offline", action="store_true", help="run the engine in this process (no cluster)")
    g.add_argument("--model", default="", help="HF directory or .gguf file (default: the shipped SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", action=_Ordered, dest="prompt", help="a text prompt (repeatable)")
    g.add_argument("--chat", action=_Ordered, dest="chat", help="a user message, rendered with the chat template (repeatable)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="KV cache budget in bytes")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    g.add_argument("-v", "--verbose", action="store_true")
    g.set_defaults(inputs=None)
    return parser


def _generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    if not args.offline:
        print("error: only offline generation exists so far; pass --offline", file=sys.stderr)
        return 2
    inputs = args.inputs or [("chat", DEFAULT_PROMPT)]
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos, logprobs=args.logprobs,
    )
    llm = LLM(args.model or None, dtype=args.dtype, device=args.device, block_size=args.block_size,
              kv_cache_memory_bytes=args.kv_cache_memory, seed=args.seed or 0)
    prompts = [[{"role": "user", "content": text}] if kind == "chat" else text for kind, text in inputs]
    outputs = llm.generate(prompts, params)
    for (kind, text), out in zip(inputs, outputs):
        if args.json:
            print(json.dumps(out.to_dict(), ensure_ascii=False), flush=True)
        else:
            print(f"### {kind}: {text}\n{out.text}\n[{out.finish_reason}, {len(out.token_ids)} tokens]\n", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
