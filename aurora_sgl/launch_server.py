"""`python -m aurora_sgl.launch_server`: serve a model with a self-training EAGLE-3 draft head.

Flags keep SGLang's names where they mean the same thing. With no arguments: the built-in reference
model on the embedded backend, on 127.0.0.1:30000.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("aurora_sgl")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m aurora_sgl.launch_server",
        description="Online speculative decoding server (embedded or SGLang backend).",
        allow_abbrev=False,
    )  # a prefix of an SGLang flag must not match ours
    ap.add_argument("--model-path", default=None, help="target model directory (default: built-in reference model)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--backend", choices=("embedded", "sglang"), default="embedded")
    ap.add_argument(
        "--speculative-num-steps",
        type=int,
        default=None,
        help="draft tokens per step (0: no speculation; default 4 embedded, 5 sglang); with "
        "--speculative-adaptive, the most a step drafts",
    )
    ap.add_argument(
        "--speculative-adaptive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="embedded: choose K per step in 0..--speculative-num-steps from the live acceptance and the "
        "measured step cost (default on); sglang: SGLang's own adaptive speculation, its step count per "
        "batch from --speculative-adaptive-config (default off, as in SGLang)",
    )
    ap.add_argument(
        "--speculative-explore-every",
        type=int,
        default=None,
        help="embedded, adaptive: where drafting does not pay, a full chain still measures the head, at most "
        "once every this many decode steps (default 32)",
    )
    ap.add_argument(
        "--speculative-explore-share",
        type=float,
        default=None,
        help="embedded, adaptive: the share of decode time those probes may cost (default 0.02)",
    )
    ap.add_argument(
        "--speculative-draft-model-path", default=None, help="EAGLE-3 checkpoint (default: random head, day-0)"
    )
    ap.add_argument(
        "--max-running-requests", type=int, default=None, help="default 16 embedded, SGLang's own for sglang"
    )
    ap.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="embedded: requests waiting for a slot (default 128); beyond running + queued the server "
        "answers 503 with Retry-After. sglang: passed to SGLang",
    )
    ap.add_argument("--context-length", type=int, default=None)
    ap.add_argument(
        "--online", action=argparse.BooleanOptionalAction, default=True, help="train the draft head on served traffic"
    )
    ap.add_argument(
        "--fallback-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="embedded, online, with --speculative-draft-model-path: keep that head frozen beside the live one; "
        "a request whose text (the prompt's end, then its first 16 tokens) it predicts better drafts with it, "
        "so a domain the live head has forgotten keeps the start head's speed (default on)",
    )
    ap.add_argument(
        "--trainer-device",
        default=None,
        help="default cpu embedded; sglang: the first GPU the server does not use (shared with a warning when "
        "it uses them all)",
    )
    ap.add_argument("--train-objective", choices=("kl", "kl_rejected", "accept"), default="kl")
    ap.add_argument(
        "--train-lr",
        type=float,
        default=None,
        help="trainer learning rate (default 1e-3, from a random or a pretrained head)",
    )
    ap.add_argument("--checkpoint-dir", default=None, help="trainer checkpoints; a restart resumes from the newest")
    ap.add_argument(
        "--trainer-config",
        default=None,
        metavar="JSON",
        help='trainer settings (TrainerConfig fields), e.g. \'{"checkpoint_every": 1, "tokens_per_step": 512}\'',
    )
    ap.add_argument("--device", default=None, help="embedded: cpu (default) or cuda; sglang: passed to SGLang")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for serving (default: all cores but one)")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return ap


def resolve_defaults(args) -> None:
    """Defaults that depend on the backend."""
    sglang = args.backend == "sglang"
    if args.speculative_num_steps is None:
        args.speculative_num_steps = 5 if sglang else 4
    if args.speculative_adaptive is None:
        args.speculative_adaptive = not sglang
    if args.max_running_requests is None and not sglang:
        args.max_running_requests = 16
    if args.max_queued_requests is None and not sglang:
        args.max_queued_requests = 128
    if args.trainer_device is None and not sglang:
        args.trainer_device = "cpu"  # sglang: chosen once SGLang's flags are parsed (sglang_backend/gpus.py)
    if args.device is None and not sglang:
        args.device = "cpu"


def validate(args) -> str | None:
    """Returns a one-line error for an invalid combination, or None."""
    if not 0 <= args.speculative_num_steps <= 16:
        return "--speculative-num-steps must be between 0 and 16"
    if args.max_running_requests is not None and args.max_running_requests < 1:
        return "--max-running-requests must be at least 1"
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        return "--max-queued-requests must be at least 0"
    if not 0 < args.port < 65536:
        return "--port must be between 1 and 65535"
    if args.context_length is not None and args.context_length < 16:
        return "--context-length must be at least 16"
    if args.api_key is not None and not args.api_key.strip():
        return "--api-key must not be empty (leave the flag out to serve without a key)"
    if args.model_path and not os.path.isdir(args.model_path):
        return f"--model-path {args.model_path} is not a directory"
    if args.speculative_draft_model_path and not os.path.isdir(args.speculative_draft_model_path):
        return f"--speculative-draft-model-path {args.speculative_draft_model_path} is not a directory"
    if args.online and args.speculative_num_steps == 0:
        return "--online needs speculation: set --speculative-num-steps >= 1 or pass --no-online"
    if args.train_lr is not None and not 0 < args.train_lr < 1:
        return "--train-lr must be in (0, 1)"
    if args.trainer_config is not None:
        error = _check_trainer_config(args)
        if error:
            return error
    if args.checkpoint_dir and not args.online:
        return "--checkpoint-dir is only used with --online"
    explore = [
        f
        for f, v in (
            ("--speculative-explore-every", args.speculative_explore_every),
            ("--speculative-explore-share", args.speculative_explore_share),
        )
        if v is not None
    ]
    if explore and (args.backend == "sglang" or not args.speculative_adaptive):
        return f"{explore[0]} tunes the embedded backend's adaptive K: it needs --backend embedded and adaptive on"
    if args.speculative_explore_every is not None and args.speculative_explore_every < 1:
        return "--speculative-explore-every must be at least 1"
    if args.speculative_explore_share is not None and not 0 <= args.speculative_explore_share <= 100:
        return "--speculative-explore-share must be between 0 and 100"
    if args.fallback_head and (args.backend == "sglang" or not args.online or not args.speculative_draft_model_path):
        return (
            "--fallback-head keeps the start head beside the live one: it needs the embedded backend, --online "
            "and --speculative-draft-model-path (SGLang serves one draft model)"
        )
    if args.backend == "sglang" and args.speculative_num_steps == 0:
        return "--backend sglang runs EAGLE-3: --speculative-num-steps must be at least 1"
    return None


def _check_trainer_config(args) -> str | None:
    """Parse --trainer-config into args.trainer_overrides; a bad one fails here, not in a trainer
    that the supervisor would restart over and over."""
    import json

    try:
        overrides = json.loads(args.trainer_config)
    except ValueError:
        return "--trainer-config must be a JSON object"
    if not isinstance(overrides, dict):
        return "--trainer-config must be a JSON object"
    if not args.online:
        return "--trainer-config is only used with --online"
    from aurora_sgl.trainer.config import TrainerConfig

    try:
        TrainerConfig(**overrides)
    except (TypeError, ValueError) as e:
        return f"--trainer-config: {e}"
    args.trainer_overrides = overrides
    return None


def _check_context_length(args) -> str | None:
    """A --context-length beyond the model's positions would be clamped without a word: refuse it."""
    if args.context_length is None:
        return None
    from transformers import AutoConfig

    from aurora_sgl import reference_model_path

    try:
        cfg = AutoConfig.from_pretrained(args.model_path or reference_model_path(), local_files_only=True)
    except (OSError, ValueError):
        return None  # the model load that follows reports what is wrong with the model
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit and args.context_length > limit:
        return f"--context-length {args.context_length} exceeds the model's {limit} positions"
    return None


def main(argv=None) -> int:
    ap = build_parser()
    # Flags we do not know belong to SGLang, and only the sglang backend passes them on.
    args, passthrough = ap.parse_known_args(argv)
    if passthrough and args.backend != "sglang":
        ap.error(f"unrecognized arguments: {' '.join(passthrough)} (SGLang flags need --backend sglang)")
    resolve_defaults(args)
    error = validate(args)  # a bad flag is named first, before any check of the machine
    if not error and args.backend == "sglang":
        from .sglang_backend.launcher import preflight

        error = preflight()  # before anything imports CUDA state or loads a model
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.backend == "sglang":
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from .sglang_backend.launcher import main as sglang_main

        return sglang_main(args, passthrough)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from aurora_sgl.engine.engine import Engine

    # Leave a core for the trainer sidecar on CPU machines.
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    draft_path = args.speculative_draft_model_path
    if args.online and args.checkpoint_dir:
        from aurora_sgl.trainer.checkpoints import newest_checkpoint

        resume = newest_checkpoint(args.checkpoint_dir)
        if resume:
            log.info("resuming the draft head from checkpoint %s", resume)
            draft_path = resume
    args.resolved_draft_path = draft_path
    error = _check_context_length(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        engine = Engine(
            args.model_path,
            draft_model_path=draft_path,
            num_speculative_steps=args.speculative_num_steps,
            max_running_requests=args.max_running_requests,
            context_length=args.context_length,
            device=args.device,
            adaptive=args.speculative_adaptive,
            **{
                name: value
                for name, value in (
                    ("explore_every", args.speculative_explore_every),
                    ("explore_share", args.speculative_explore_share),
                )
                if value is not None
            },
        )
    except (OSError, ValueError) as e:
        print(f"error: could not load the model: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return serve(engine, args)


def serve(engine, args) -> int:
    import asyncio

    import uvicorn

    from aurora_sgl.serving.app import create_app
    from aurora_sgl.serving.async_engine import AsyncEngine
    from aurora_sgl.serving.metrics import Metrics
    from aurora_sgl.serving.timeouts import HeaderTimeoutH11Protocol

    metrics = Metrics(engine.k)
    aengine = AsyncEngine(
        engine,
        on_finish=lambda s, now: metrics.request_finished(s.request, s.submitted_at, s.first_token_at, now),
        on_step=lambda records, dt: metrics.step_seconds.observe(dt),
    )
    model_path = engine.model_path
    online = None
    if args.online:
        from aurora_sgl.online.sidecar import OnlineTraining
        from aurora_sgl.transport.segments import sweep_stale

        sweep_stale()  # segments and files of servers that were SIGKILLed (their cleanup never ran)
        online = OnlineTraining(
            engine,
            model_path=model_path,
            objective=args.train_objective,
            trainer_device=args.trainer_device,
            checkpoint_dir=args.checkpoint_dir,
            init_head=args.resolved_draft_path,
            fallback_to_start=args.fallback_head is not False,
            trainer_config=dict(
                getattr(args, "trainer_overrides", {}), **({"lr": args.train_lr} if args.train_lr else {})
            ),
        )
        online.start()
    name = args.served_model_name or os.path.basename(os.path.normpath(model_path))
    app = create_app(
        aengine,
        metrics,
        served_model_name=name,
        model_path=model_path,
        api_key=args.api_key,
        server_args={k: v for k, v in vars(args).items() if k != "api_key"},
        flywheel=online.flywheel if online else None,
        max_queued_requests=args.max_queued_requests,
        trainer_state=online.trainer_state if online else None,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=5,
        http=HeaderTimeoutH11Protocol,
        access_log=args.log_level == "debug",
    )
    server = uvicorn.Server(config)

    async def announce():
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        url = f"http://{args.host}:{args.port}"
        auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""
        print(
            f"aurora_sgl serving '{name}' at {url}  (OpenAI API under {url}/v1, metrics at {url}/metrics)", flush=True
        )
        print(
            f"try: curl -s {url}/v1/completions{auth} -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{name}", "prompt": "def add(a, b):", "max_tokens": 32, "temperature": 0}}\'',
            flush=True,
        )

    async def main_async():
        aengine.start()
        task = asyncio.create_task(announce())
        try:
            await server.serve()
        finally:
            task.cancel()
            aengine.shutdown()
            if online is not None:
                online.close()

    asyncio.run(main_async())
    return 0


if __name__ == "__main__":
    sys.exit(main())
