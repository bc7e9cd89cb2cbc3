"""`launch_server --backend sglang`: SGLang's own HTTP server with our plugin, plus the trainer.

    python -m aurora_sgl.launch_server --backend sglang --model-path M \
        [--speculative-draft-model-path D] [--trainer-device cuda:N] [any SGLang flag]

1. ServerArgs come from SGLang's own `prepare_server_args` on an argv we build: EAGLE3 with
   5 steps, topk 1, 6 draft tokens unless the command line says otherwise; every flag our parser
   does not know passes through unchanged.
2. Without a draft path a random EAGLE-3 head shaped for the target is written to a temp dir
   (day-0: the trainer starts from it).
3. `AURORA_SGL_HANDOFF_DIR` (inherited by SGLang's scheduler processes) switches the plugin on.
   The scheduler of TP rank 0 creates the ring and the weight store on its GPU and writes
   `handoff.json` (+ CUDA IPC handles beside it); with `--dp-size N` the TP rank 0 of every other
   replica writes its own ring's `ring_dp<d>.json` there too, which the trainer picks up whenever
   it appears. A supervisor thread here waits for the handoff and starts
   `python -m aurora_sgl.trainer` on the trainer device (by default the first GPU SGLang does not
   use: gpus.py), restarting it if it dies.
4. SGLang's server runs in this process (`sglang.launch_server.run_server`), as `sglang serve` would.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import threading

log = logging.getLogger("aurora_sgl.sglang")

DEFAULT_STEPS = 5
DEFAULT_TOPK = 1
PLUGIN_NAME = "aurora_sgl"


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def target_dtype(model_path: str) -> str | None:
    """The dtype SGLang serves the target in under `--dtype auto` (its own resolution of the
    target's config), or None when the config is not on this machine (SGLang will fetch it)."""
    from sglang.srt.configs.model_config import _get_and_verify_dtype
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError):
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return str(_get_and_verify_dtype(cfg, "auto")).removeprefix("torch.")


def sglang_argv(args, passthrough: list[str], draft_path: str) -> list[str]:
    """The SGLang command line equivalent to ours (without the program name)."""
    from aurora_sgl import reference_model_path

    model_path = args.model_path or reference_model_path()
    steps = args.speculative_num_steps if args.speculative_num_steps is not None else DEFAULT_STEPS
    argv = [
        "--model-path",
        model_path,
        "--speculative-algorithm",
        "EAGLE3",
        "--speculative-draft-model-path",
        draft_path,
        "--speculative-num-steps",
        str(steps),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if not _has_flag(passthrough, "--speculative-eagle-topk"):
        argv += ["--speculative-eagle-topk", str(DEFAULT_TOPK)]
        if not _has_flag(passthrough, "--speculative-num-draft-tokens"):
            argv += ["--speculative-num-draft-tokens", str(steps + 1)]  # a chain: steps + root
    # The draft's ModelConfig is built from the draft's config with the server's --dtype: under
    # `auto` a head saved in float32 becomes float16 while the target (say bf16) shares its
    # embedding into it. One explicit dtype, the target's, serves both alike.
    dtype = None if _has_flag(passthrough, "--dtype") else target_dtype(model_path)
    if dtype is not None:
        argv += ["--dtype", dtype]
    if getattr(args, "speculative_adaptive", False) and not _has_flag(passthrough, "--speculative-adaptive"):
        # SGLang's own adaptive speculation: its controller picks the step count per batch from
        # graphs captured for each candidate (`--speculative-adaptive-config` passes through).
        argv.append("--speculative-adaptive")
    for flag, value in (
        ("--served-model-name", args.served_model_name),
        ("--api-key", args.api_key),
        ("--context-length", args.context_length),
        ("--max-running-requests", args.max_running_requests),
        ("--max-queued-requests", getattr(args, "max_queued_requests", None)),
        ("--device", args.device),
        ("--log-level", args.log_level),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv + list(passthrough)


def build_server_args(args, passthrough: list[str], draft_path: str):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(sglang_argv(args, passthrough, draft_path))


def day0_head(model_path: str, out_dir: str, draft_vocab_size: int = 32000) -> str:
    """A random EAGLE-3 head in SGLang's layout for the target at `model_path`."""
    import torch
    from transformers import AutoConfig

    from aurora_sgl.engine.draft_head import Eagle3Config, Eagle3Head

    cfg = AutoConfig.from_pretrained(model_path, local_files_only=True)
    head = Eagle3Head(
        Eagle3Config.for_target(cfg, min(draft_vocab_size, cfg.vocab_size)),
        torch.zeros(cfg.vocab_size, cfg.hidden_size),
    )
    head.save(out_dir)
    return out_dir


def preflight(who: str = "--backend sglang", instead: str = "; use --backend embedded") -> str | None:
    """One-line reason the SGLang backend cannot run here, or None; `who` is what needs it (the
    launcher's flag, or the device check), `instead` what to do without a GPU."""
    try:
        import torch
    except ImportError:
        return f"{who} needs torch"
    if not torch.cuda.is_available():
        return f"{who} needs a CUDA GPU and none is visible here{instead}"
    try:
        from importlib.metadata import entry_points

        import sglang  # noqa: F401
    except ImportError:
        return f"{who} needs sglang==0.5.23 (pip install -e '.[sglang]')"
    if not any(ep.name == PLUGIN_NAME for ep in entry_points(group="sglang.srt.plugins")):
        return (
            "SGLang cannot find the aurora_sgl plugin entry point; reinstall the package "
            "(pip install -e .) so its metadata declares it"
        )
    return None


def unsupported(passthrough: list[str]) -> str | None:
    """One-line reason an SGLang flag cannot run with online training, or None.
    `--enable-multi-layer-eagle` selects `MultiLayerEagleWorkerV2`, not a subclass of the
    `EAGLEWorkerV2` the plugin hooks: nothing would be captured and the trainer would wait forever."""
    if _has_flag(passthrough, "--enable-multi-layer-eagle"):
        return "--enable-multi-layer-eagle is not supported by --backend sglang (its worker is not hooked)"
    return None


def draft_error(path: str | None) -> str | None:
    """One-line reason the draft head at `path` cannot be served and trained, or None. The plugin
    and the trainer read the head from this directory; without weights they could not, and online
    training would turn itself off minutes later, inside a scheduler. No path: a day-0 head."""
    if path is None:
        return None
    if not os.path.isdir(path):
        return f"--speculative-draft-model-path {path} is not a directory"
    from aurora_sgl.engine.draft_head import weight_files

    if not weight_files(path):
        return f"--speculative-draft-model-path {path} holds no weights (model.safetensors or pytorch_model.bin)"
    return None


def prepare_checkpoint_dir(path: str | None) -> tuple[str | None, str | None]:
    """(absolute checkpoint dir, None), or (None, one-line error). A missing directory is created
    0700 (checkpoints are the served weights); an existing one must accept a new file, tried by
    writing one -- the trainer writes there minutes later, far from the command line."""
    if not path:
        return None, None
    root = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
    except FileExistsError:
        return None, f"--checkpoint-dir {path} exists and is not a directory"
    except OSError as e:
        return None, f"--checkpoint-dir {path} cannot be created: {e.strerror}"
    if not os.path.isdir(root):
        return None, f"--checkpoint-dir {path} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        return None, f"--checkpoint-dir {path} is not writable: {e.strerror}"
    return root, None


class TrainerSidecar:
    """Waits for the scheduler's handoff, then runs the trainer under the shared supervisor."""

    def __init__(self, handoff_dir: str, args, pretrained: bool):
        from aurora_sgl.online.supervisor import TrainerSupervisor

        self.dir, self.args, self.pretrained = handoff_dir, args, pretrained
        self.supervisor = TrainerSupervisor(os.path.join(handoff_dir, "trainer_spec.json"))
        self.status = None
        self.handoff: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aurora-sgl-trainer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def proc(self):
        return self.supervisor.proc

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    def trainer_spec(self):
        """The trainer's spec, from the handoff the owner scheduler wrote."""
        from aurora_sgl.trainer.spec import TrainerSpec
        from aurora_sgl.transport.trainer_status import TrainerStatus

        if self.status is None:
            self.status = TrainerStatus.create("aurora_trainer")
        h = self.handoff
        cfg = dict(getattr(self.args, "trainer_overrides", {}), objective=self.args.train_objective)
        if self.args.train_lr:
            cfg["lr"] = self.args.train_lr
        # The served checkpoint, with its exact shapes; restarts resume from the newest checkpoint.
        return TrainerSpec(
            ring=h["ring"],
            ring_dir=self.dir,  # the other DP replicas' rings (ring_dp<d>.json)
            store=h["store"],
            status=self.status.spec(),
            model_path=h["model_path"],
            init_head=h["draft_path"],
            pretrained=self.pretrained,
            aux_layer_ids=h["aux_layer_ids"],
            draft_vocab_size=h["draft_vocab_size"],
            config=cfg,
            checkpoint_dir=self.args.checkpoint_dir,
            threads=1,
            device=self.args.trainer_device,
            parent_pid=os.getpid(),
        )

    def _run(self) -> None:
        from aurora_sgl.transport.handoff import read_handoff

        from .plugin import HANDOFF

        path = os.path.join(self.dir, HANDOFF)
        while not os.path.exists(path):
            if self._stop.wait(0.5):
                return
        self.handoff = read_handoff(path)
        self.supervisor.start(self.trainer_spec())
        while not self._stop.wait(30):
            log.info("aurora_sgl counters: %s", json.dumps(self.counters()))

    def counters(self) -> dict:
        """Plugin counters per scheduler (`dp<d>_rank<t>`: DP replica, TP rank) and the trainer's
        status."""
        out = {}
        for f in sorted(glob.glob(os.path.join(self.dir, "counters_dp*_rank*.json"))):
            try:
                with open(f) as fh:
                    out[os.path.basename(f)[len("counters_") : -len(".json")]] = json.load(fh)
            except (OSError, ValueError):
                pass
        if self.status is not None:
            out["trainer"] = dict(self.status.snapshot(), **self.supervisor.state())
        return out

    def close(self) -> None:
        self._stop.set()
        self.supervisor.stop()
        names = [self.handoff[k]["name"] for k in ("ring", "store")] if self.handoff else []
        names += replica_ring_names(self.dir)
        for name in names:  # the scheduler that owns them may have been killed
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
        if self.status is not None:
            self.status.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def replica_ring_names(directory: str) -> list[str]:
    """The segment names of the DP replicas' rings handed over in `directory` (plain JSON: the CUDA
    handles beside each spec are not needed to unlink a name)."""
    from aurora_sgl.transport.ring_set import REPLICA_RINGS

    names = []
    for path in glob.glob(os.path.join(directory, REPLICA_RINGS)):
        try:
            with open(path) as f:
                name = json.load(f)["ring"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(name, str) and os.path.basename(name) == name:  # a name in /dev/shm, nothing else
            names.append(name)
    return names


def main(args, passthrough: list[str]) -> int:
    # Before anything starts: the trainer resumes from and saves into this directory.
    args.checkpoint_dir, error = prepare_checkpoint_dir(getattr(args, "checkpoint_dir", None))
    if not error:
        error = unsupported(passthrough) or draft_error(getattr(args, "speculative_draft_model_path", None))
        error = error or preflight()
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from aurora_sgl import reference_model_path

    from .plugin import ENV_DIR

    model_path = args.model_path or reference_model_path()
    from aurora_sgl.transport.segments import sweep_stale

    sweep_stale()  # what a SIGKILLed server left behind
    handoff_dir = tempfile.mkdtemp(prefix=f"aurora_sgl_{os.getpid()}_")  # 0700
    draft_path = args.speculative_draft_model_path
    if draft_path is None:
        draft_path = day0_head(model_path, os.path.join(handoff_dir, "day0_head"))
        log.info("no draft given: random EAGLE-3 head at %s (day 0)", draft_path)
    try:
        server_args = build_server_args(args, passthrough, draft_path)
    except SystemExit as e:  # SGLang's argparse already printed its one-line error
        shutil.rmtree(handoff_dir, ignore_errors=True)
        return int(e.code or 2)
    if args.online:  # the GPUs SGLang will use are known only now, from its own parse
        import torch

        from .gpus import trainer_device_for

        choice = trainer_device_for(server_args, torch.cuda.device_count(), args.trainer_device)
        if choice.error:
            print(f"error: {choice.error}", file=sys.stderr)
            shutil.rmtree(handoff_dir, ignore_errors=True)
            return 2
        if choice.warning:
            log.warning("%s", choice.warning)
        args.trainer_device = choice.device
    if args.online:  # the plugin's hooks stay inert without it
        os.environ[ENV_DIR] = handoff_dir
    plugins = os.environ.get("SGLANG_PLUGINS")
    if plugins and PLUGIN_NAME not in [p.strip() for p in plugins.split(",")]:
        os.environ["SGLANG_PLUGINS"] = f"{plugins},{PLUGIN_NAME}"
    sidecar = (
        TrainerSidecar(handoff_dir, args, pretrained=args.speculative_draft_model_path is not None)
        if args.online
        else None
    )
    if sidecar is not None:
        sidecar.start()
    serve(server_args, sidecar, handoff_dir)
    return 0


def serve(server_args, sidecar: TrainerSidecar | None, handoff_dir: str) -> None:
    """SGLang's server in this process until it stops; then the trainer, our files, and every
    process SGLang started (schedulers, detokenizer), as SGLang's own entry points end: a Ctrl-C
    or a crash must not leave schedulers holding the GPUs."""
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    try:
        run_server(server_args)
    finally:
        if sidecar is not None:
            sidecar.close()
        else:
            shutil.rmtree(handoff_dir, ignore_errors=True)
        kill_process_tree(os.getpid(), include_parent=False)
