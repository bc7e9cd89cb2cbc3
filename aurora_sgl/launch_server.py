"""`python -m aurora_sgl.launch_server`: serve a model with a self-training EAGLE-3 draft head.

Flags keep SGLang's names where they mean the same thing. The HTTP server (OpenAI + SGLang-native
API) is its own piece of work; until it lands this command loads the engine, runs one speculative
generation on the reference model to show the loop works, and says so.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m aurora_sgl.launch_server",
                                 description="Online speculative decoding server (embedded or SGLang backend).")
    ap.add_argument("--model-path", default=None, help="target model directory (default: built-in reference model)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--backend", choices=("embedded", "sglang"), default="embedded")
    ap.add_argument("--speculative-num-steps", type=int, default=4, help="draft tokens per step (0: no speculation)")
    ap.add_argument("--speculative-draft-model-path", default=None, help="EAGLE-3 checkpoint (default: random head, day-0)")
    ap.add_argument("--max-running-requests", type=int, default=16)
    ap.add_argument("--context-length", type=int, default=None)
    ap.add_argument("--online", action=argparse.BooleanOptionalAction, default=True, help="train the draft head on served traffic")
    ap.add_argument("--trainer-device", default="cpu")
    ap.add_argument("--train-objective", choices=("kl", "kl_rejected", "accept"), default="kl")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for serving (default: all cores but one)")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return ap


def validate(args) -> str | None:
    """Returns a one-line error for an invalid combination, or None."""
    if not 0 <= args.speculative_num_steps <= 16:
        return "--speculative-num-steps must be between 0 and 16"
    if args.max_running_requests < 1:
        return "--max-running-requests must be at least 1"
    if not 0 < args.port < 65536:
        return "--port must be between 1 and 65535"
    if args.context_length is not None and args.context_length < 16:
        return "--context-length must be at least 16"
    if args.model_path and not os.path.isdir(args.model_path):
        return f"--model-path {args.model_path} is not a directory"
    if args.speculative_draft_model_path and not os.path.isdir(args.speculative_draft_model_path):
        return f"--speculative-draft-model-path {args.speculative_draft_model_path} is not a directory"
    if args.backend == "sglang":
        return "--backend sglang is not available yet in this build (the SGLang plugin is pending); use --backend embedded"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    error = validate(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import torch

    from .engine import Engine
    from .sampling import SamplingParams

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    engine = Engine(args.model_path, draft_model_path=args.speculative_draft_model_path,
                    num_speculative_steps=args.speculative_num_steps, max_running_requests=args.max_running_requests,
                    context_length=args.context_length, device=args.device)
    prompt = "def fibonacci(n):\n"
    out = engine.generate(prompt, SamplingParams(max_new_tokens=48))[0]
    print(f"aurora_sgl engine ready on {engine.model_path}")
    print(f"prompt: {prompt!r}\ncompletion: {out['text']!r}\nmeta_info: {out['meta_info']}")
    print("The HTTP server (OpenAI and SGLang-native API) is not in this build yet; this run showed the "
          "speculative engine end to end.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
