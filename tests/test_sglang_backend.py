"""The SGLang backend against the real sglang==0.5.23 wheel, on CPU.

SGLang does not serve on these CPUs, but its classes import and its EAGLE-3 draft module builds on
CPU (a one-process gloo group, as SGLang's own layer tests do; rotary embedding told it runs on CPU
so it does not look for vllm's kernel). What needs a GPU -- the CUDA staging events, IPC, a served
request -- is `launch/device_check.sh`'s job.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sglang = pytest.importorskip("sglang")

from sglang.srt.layers.logits_processor import LogitsProcessorOutput  # noqa: E402
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch  # noqa: E402
from sglang.srt.managers.utils import GenerationBatchResult  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.speculative.eagle_info import EagleVerifyInput  # noqa: E402
from sglang.srt.speculative.eagle_worker_common import _compact_accept_to_front  # noqa: E402
from sglang.srt.speculative.eagle_worker_v2 import EAGLEWorkerV2  # noqa: E402

from aurora_sgl import reference_head_path, reference_model_path  # noqa: E402
from aurora_sgl.engine.draft_head import Eagle3Head  # noqa: E402
from aurora_sgl.sglang_backend import plugin  # noqa: E402
from aurora_sgl.sglang_backend.capture import CaptureStaging  # noqa: E402
from aurora_sgl.sglang_backend.swap import DraftSwapper  # noqa: E402
from aurora_sgl.transport.signal_ring import SignalRing  # noqa: E402
from aurora_sgl.transport.weight_store import WeightStore, layout_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---- plugin discovery -------------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import json, os
    import sglang.srt.plugins as plugins
    from sglang.srt.speculative.eagle_worker_v2 import EAGLEWorkerV2
    from sglang.srt.managers.scheduler import Scheduler
    kept = {"verify": EAGLEWorkerV2.verify}  # in a dict: SGLang rebinds module globals that hold it

    def state():
        from aurora_sgl.sglang_backend import plugin
        def ours(fn, hook):
            return hook in [c.cell_contents for c in (fn.__closure__ or ())]
        inner = getattr(EAGLEWorkerV2.verify, "__wrapped__", None)
        return {"verify_wrapped": EAGLEWorkerV2.verify is not kept["verify"] and inner is kept["verify"],
                "verify_ours": ours(EAGLEWorkerV2.verify, plugin._around_verify),
                "ingest_ours": ours(Scheduler.ingest_requests, plugin._after_iteration),
                "prefill_ours": ours(EAGLEWorkerV2._forward_prefill_batch, plugin._around_prefill)}

    os.environ["SGLANG_PLUGINS"] = "some_other_plugin"  # a whitelist without us
    plugins.load_plugins()
    disabled = state()
    # load_plugins runs once per process; start over as a fresh scheduler process would
    del os.environ["SGLANG_PLUGINS"]
    plugins._plugins_loaded = False
    plugins.load_plugins()
    print(json.dumps({"disabled": disabled, "enabled": state()}))
""")


def _dist_info(tmp: Path) -> Path:
    """A dist-info for this checkout with the entry points pyproject.toml declares (the editable
    install's metadata may predate them)."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    d = tmp / "aurora_sgl-0.1.0.dist-info"
    d.mkdir()
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: aurora-sgl\nVersion: 0.1.0\n")
    lines = []
    for group, entries in eps.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in entries.items()]
    (d / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return tmp


def test_load_plugins_discovers_entry_point_and_whitelist_disables(tmp_path):
    path = _dist_info(tmp_path)
    env = dict(os.environ, PYTHONPATH=f"{path}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["disabled"] == {
        "verify_wrapped": False,
        "verify_ours": False,
        "ingest_ours": False,
        "prefill_ours": False,
    }
    assert out["enabled"] == {"verify_wrapped": True, "verify_ours": True, "ingest_ours": True, "prefill_ours": True}


# ---- capture --------------------------------------------------------------------------------------
H, A = 8, 24  # hidden, aux (3H)


def _step(topk: int, seed: int, steps: int = 3):
    """A verify step as `run_eagle_verify` returns it: SGLang's real batch / verify input / result
    types, and for topk > 1 SGLang's own path compaction applied to predict and hidden states.
    Returns (worker, batch, result, expected rows per request from the *uncompacted* tensors)."""
    g = torch.Generator().manual_seed(seed)
    d = steps + 1 if topk == 1 else 8
    bs = 3
    if topk == 1:  # chains accepting 2 (or all), all, and none of the drafts
        accepted = [min(2, steps), steps, 0]
        accept_index = torch.tensor([[i * d + j if j <= a else -1 for j in range(d)] for i, a in enumerate(accepted)])
    else:  # tree paths: root 0, then nodes anywhere in the block
        accept_index = torch.tensor([[0, 3, 6, -1], [8, 10, 13, 15], [16, -1, -1, -1]])
    accept_lens = (accept_index >= 0).sum(1)
    draft = torch.randint(0, 100, (bs * d,), generator=g)
    predict_raw = torch.randint(0, 100, (bs * d,), generator=g)
    aux_raw = torch.randn(bs * d, A, generator=g)
    final = torch.randn(bs * d, H, generator=g)
    predict, aux = predict_raw, aux_raw
    if topk > 1:
        predict = _compact_accept_to_front(predict_raw, accept_index, bs, num_draft_tokens=d)
        aux = _compact_accept_to_front(aux_raw, accept_index, bs, num_draft_tokens=d)
    reqs = [Req(f"req-{i}", "", [1, 2, 3], SamplingParams(max_new_tokens=8)) for i in range(bs)]
    seq_lens = torch.tensor([10, 20, 30])
    verify = EagleVerifyInput(
        draft_token=draft,
        custom_mask=None,
        positions=None,
        retrieve_index=None,
        retrieve_next_token=None,
        retrieve_next_sibling=None,
        retrieve_cum_len=None,
        spec_steps=steps,
        topk=topk,
        draft_token_num=d,
        capture_hidden_mode=CaptureHiddenMode.FULL,
        seq_lens_sum=int(seq_lens.sum()),
        seq_lens_cpu=seq_lens,
    )
    batch = ScheduleBatch(
        reqs=reqs,
        device="cpu",
        forward_mode=ForwardMode.TARGET_VERIFY,
        seq_lens=seq_lens,
        seq_lens_cpu=seq_lens,
        spec_info=verify,
    )
    result = GenerationBatchResult(
        logits_output=LogitsProcessorOutput(next_token_logits=None, hidden_states=aux, last_hidden_states=final),
        next_token_ids=predict,
        accept_lens=accept_lens,
        accept_index=accept_index,
        speculative_num_draft_tokens=d,
    )
    worker = EAGLEWorkerV2.__new__(EAGLEWorkerV2)  # the real class; only the attributes the hook reads
    worker.topk, worker.speculative_num_steps, worker.speculative_num_draft_tokens = topk, steps, d
    expected = []
    for i in range(bs):
        rows = accept_index[i, : int(accept_lens[i])]
        nxt = predict_raw[rows]
        expected.append(
            {
                "id": f"req-{i}",
                "position": int(seq_lens[i]),
                "accepted": len(rows) - 1,
                "next": nxt,
                "input": torch.cat([draft[i * d : i * d + 1], nxt[:-1]]),
                "aux": aux_raw[rows],
                "final": final[rows],
            }
        )
    return worker, batch, result, expected


@pytest.mark.parametrize("topk", [1, 2])
def test_capture_hook_writes_exactly_the_accepted_rows(topk):
    worker, batch, result, expected = _step(topk, seed=topk)
    ring = SignalRing.create("test_sgl_ring", 16, worker.speculative_num_steps + 1, A, H, worker.speculative_num_steps)
    reader = SignalRing.attach(ring.spec())
    staging = CaptureStaging(8, worker.speculative_num_steps, A, H)
    rt = plugin.Runtime(staging=staging, ring=ring, store=None, swapper=None, leader=True, handoff_dir=None)
    plugin.set_runtime(rt)
    try:
        out = plugin._around_verify(lambda w, b: result, worker, batch)  # the hook, around a verify
        assert out is result
        assert reader.read(16) == []  # nothing reaches the ring inside the step
        rt.iteration()  # the scheduler iteration drains
        recs = reader.read(16)
        assert rt.stats()["records_written"] == 3 and rt.stats()["ring_written"] == 3
    finally:
        plugin.set_runtime(None)
        reader.close()
        ring.close()
    _assert_accepted_chains(recs, expected, worker.speculative_num_steps, worker.speculative_num_steps)


def _assert_accepted_chains(recs, expected, steps: int, k: int) -> None:
    """Each record is its request's accepted chain in a step that drafted `steps` tokens, in a
    ring of width `k`: exact rows, and outcome / target token per draft position."""
    assert [r.request_id for r in recs] == [e["id"] for e in expected]
    for r, e in zip(recs, expected):
        assert r.position == e["position"] and r.num_accepted == e["accepted"]
        assert torch.equal(r.next_tokens, e["next"]) and torch.equal(r.input_tokens, e["input"])
        assert torch.equal(r.aux_hidden, e["aux"]) and torch.equal(r.final_hidden, e["final"])
        want = [1] * e["accepted"] + ([0] if e["accepted"] < steps else [])
        assert r.outcome.tolist() == want + [-1] * (k - len(want))
        reached = e["next"][: len(want)].tolist()  # the target's token at each draft position it verified
        assert r.target_tokens.tolist() == reached + [-1] * (k - len(reached))


def test_the_staging_is_sized_for_sglangs_largest_adaptive_step(tmp_path):
    """With --speculative-adaptive SGLang's controller may draft more than --speculative-num-steps
    (its default candidates go up to 7): the runtime sizes everything for the largest."""
    from types import SimpleNamespace

    from sglang.srt.speculative.adaptive_runtime_state import AdaptiveController
    from sglang.srt.speculative.adaptive_spec_params import AdaptiveSpeculativeParams

    worker = SimpleNamespace(speculative_num_steps=5, adaptive_controller=None)
    assert plugin.max_draft_steps(worker) == 5
    worker.adaptive_controller = AdaptiveController(worker, AdaptiveSpeculativeParams(initial_steps=5, cfg_path=None))
    assert plugin.max_draft_steps(worker) == max(worker.adaptive_controller.candidate_steps) == 7
    config = tmp_path / "adaptive.json"
    config.write_text(json.dumps({"1": {"candidate_steps": [0, 2]}}))
    worker.adaptive_controller = AdaptiveController(
        worker, AdaptiveSpeculativeParams(initial_steps=2, cfg_path=str(config))
    )
    worker.speculative_num_steps = 2
    assert plugin.max_draft_steps(worker) == 2


@pytest.mark.parametrize("steps", [0, 2])
def test_capture_of_a_step_drafting_fewer_than_the_maximum(steps):
    """SGLang's adaptive speculation verifies fewer drafts than the ring's K (0: the trivial verify
    of one row): the positions never drafted are NOT_REACHED with no draft or target token, the
    rows of each accepted chain are exact, and stale rows of a wider step do not leak in."""
    k_max = 5
    ring = SignalRing.create("test_sgl_ring_k", 16, k_max + 1, A, H, k_max)
    reader = SignalRing.attach(ring.spec())
    staging = CaptureStaging(8, k_max, A, H, slots=1)
    rt = plugin.Runtime(staging=staging, ring=ring, store=None, swapper=None, leader=True, handoff_dir=None)
    plugin.set_runtime(rt)
    try:
        worker, batch, result, _ = _step(1, seed=7, steps=k_max)  # a full-width step fills the slot first
        plugin._around_verify(lambda w, b: result, worker, batch)
        rt.iteration()
        reader.read(16)
        worker, batch, result, expected = _step(1, seed=8, steps=steps)
        plugin._around_verify(lambda w, b: result, worker, batch)
        rt.iteration()
        recs = reader.read(16)
    finally:
        plugin.set_runtime(None)
        reader.close()
        ring.close()
    _assert_accepted_chains(recs, expected, steps, k_max)
    for r in recs:
        drafted = batch.spec_info.draft_token.view(3, steps + 1)[int(r.request_id[-1]), 1:].tolist()
        assert r.draft_tokens.tolist() == drafted + [-1] * (k_max - steps)


# ---- the real EAGLE-3 draft module on CPU -----------------------------------------------------------
@pytest.fixture(scope="module")
def sgl_draft_factory():
    import sglang.srt.layers.rotary_embedding.base as rope_base
    import torch.distributed as dist
    from sglang.srt.models.llama_eagle3 import LlamaForCausalLMEagle3
    from sglang.srt.runtime_context import get_context
    from sglang.srt.server_args import ServerArgs
    from sglang.test.layer_ut_utils import init_single_process_dist
    from transformers import LlamaConfig

    get_context().set_server_args(ServerArgs(model_path=reference_model_path(), device="cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_single_process_dist(port)
    saved = rope_base._is_cpu
    rope_base._is_cpu = True  # construction only: no forward runs here

    def make(head_dir: str):
        cfg = LlamaConfig(**json.loads((Path(head_dir) / "config.json").read_text()))
        return LlamaForCausalLMEagle3(cfg)

    yield make
    rope_base._is_cpu = saved
    if dist.is_initialized():
        dist.destroy_process_group()


def _load_with_sglang(model, ckpt_dir: Path):
    from safetensors.torch import load_file

    model.load_weights(load_file(str(ckpt_dir / "model.safetensors")).items())
    return model


def test_trainer_checkpoint_loads_into_sglang_eagle3_class(sgl_draft_factory, tmp_path):
    """A checkpoint written by the trainer fills every parameter of SGLang's LlamaForCausalLMEagle3
    (but the shared embedding) through its own load_weights, and its d2t becomes the hot map."""
    from aurora_sgl.trainer.checkpoints import save_checkpoint

    head = Eagle3Head.load(reference_head_path(), torch.zeros(0))
    path = save_checkpoint(head, tmp_path / "ckpt", 7, {"steps": 7}, keep=2)
    model = sgl_draft_factory(str(path))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    _load_with_sglang(model, path)
    params = dict(model.named_parameters())
    unfilled = sorted(n for n, p in params.items() if torch.isnan(p).any() and n != "model.embed_tokens.weight")
    assert unfilled == []
    sd = head.serving_state()
    a = "model.layers.0"
    assert torch.equal(
        params[f"{a}.self_attn.qkv_proj.weight"], torch.cat([sd[f"midlayer.self_attn.{x}_proj.weight"] for x in "qkv"])
    )
    assert torch.equal(
        params[f"{a}.mlp.gate_up_proj.weight"],
        torch.cat([sd["midlayer.mlp.gate_proj.weight"], sd["midlayer.mlp.up_proj.weight"]]),
    )
    assert torch.equal(params["lm_head.weight"], sd["lm_head.weight"])
    assert torch.equal(model.get_hot_token_id(), head.hot_ids)


def test_day0_head_for_the_target_is_in_sglang_eagle3_layout(sgl_draft_factory, tmp_path):
    from aurora_sgl.sglang_backend.launcher import day0_head

    path = Path(day0_head(reference_model_path(), str(tmp_path / "day0")))
    model = sgl_draft_factory(str(path))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    _load_with_sglang(model, path)
    assert [n for n, p in model.named_parameters() if torch.isnan(p).any()] == ["model.embed_tokens.weight"]
    assert model.get_hot_token_id() is not None and not model.load_lm_head_from_target


def test_swap_writes_in_place_skips_shared_embedding_and_swaps_d2t(sgl_draft_factory, tmp_path):
    served = Eagle3Head.load(reference_head_path(), torch.zeros(0))
    model = _load_with_sglang(sgl_draft_factory(reference_head_path()), Path(reference_head_path()))
    target_embed = torch.randn_like(model.model.embed_tokens.weight)
    with torch.no_grad():  # SGLang's set_embed shares the target's embedding with the draft
        model.model.embed_tokens.weight.data = target_embed
    embed_before = target_embed.clone()
    hot = model.get_hot_token_id().clone()  # the draft worker's own map (a device copy on GPU)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    hot_ptr = hot.data_ptr()

    new = Eagle3Head.load(reference_head_path(), torch.zeros(0))
    new.reset_parameters(seed=3)  # different weights ...
    new.set_draft_vocab(torch.arange(1000, 1000 + new.config.draft_vocab_size))  # ... and a different vocab
    store = WeightStore.create("test_sgl_store", layout_of(served.serving_state()))
    try:
        store.publish(served.serving_state())  # version 1: what is being served
        swapper = DraftSwapper(model, hot, store.names, store.layout, shared=[target_embed])
        assert swapper.mode == "plan" and swapper.skipped == []
        rt = plugin.Runtime(staging=None, ring=None, store=store, swapper=swapper, leader=True, handoff_dir=None)
        plugin.set_runtime(rt)
        bad = {
            n: (t.clone().fill_(float("nan")) if t.is_floating_point() else t) for n, t in new.serving_state().items()
        }
        store.publish(bad)  # version 2: refused by the leader's poll, the trainer is told
        assert plugin._after_pull(["req"], None) is None and rt.counters["refused"] == 1
        assert store.last_rollback() == 2
        version = store.publish(new.serving_state())
        # the marker rides the pulled requests, every rank strips it, the iteration swaps
        pulled = plugin._after_pull(["req"], None)
        assert pulled == ["req", plugin.SwapMarker(version)]
        assert plugin._after_recv(pulled, None) == ["req"]
        plugin._after_iteration(None, _cpu_scheduler())
        assert rt.draft_version == version and rt.counters["swaps"] == 1
    finally:
        plugin.set_runtime(None)
        store.close()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert hot.data_ptr() == hot_ptr and torch.equal(hot, new.hot_ids)
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    new.save(tmp_path / "new")  # what SGLang itself would load from that head
    ref = _load_with_sglang(sgl_draft_factory(str(tmp_path / "new")), tmp_path / "new")
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if n != "model.embed_tokens.weight":
            assert torch.equal(p, q), n


def _cpu_scheduler():
    """SGLang's Scheduler without its GPU init; on CPU there is no stream to queue the swap on."""
    from sglang.srt.managers.scheduler import Scheduler

    s = Scheduler.__new__(Scheduler)
    s.enable_overlap, s.forward_stream, s.schedule_stream = True, None, None
    return s


class _Target(torch.nn.Module):
    """What SGLang's init_lm_head asks of the target model: its embedding and lm_head."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden))
        self.lm_head = None

    def get_embed_and_head(self):
        return self.embed, None


def test_hot_map_is_bound_to_the_worker_tensor_sglang_creates_after_the_init_hook(sgl_draft_factory):
    """SGLang's order: EAGLEWorkerV2.__init__ (our hook builds the swapper) -> alloc_memory_pool ->
    EagleDraftWorker.init_token_map / init_lm_head, which create the `hot_token_id` drafting
    indexes. The first swap must write that very tensor."""
    from types import SimpleNamespace

    from sglang.srt.speculative.eagle_worker_v2 import EagleDraftWorker
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    served = Eagle3Head.load(reference_head_path(), torch.zeros(0))
    draft = _load_with_sglang(sgl_draft_factory(reference_head_path()), Path(reference_head_path()))
    c = served.config
    target = _Target(c.vocab_size, c.hidden_size)
    runner = SimpleNamespace(
        model=target, model_config=SimpleNamespace(model_path=None, revision=None), load_config=None
    )
    dw = object.__new__(EagleDraftWorker)  # what its __init__ leaves: no hot map yet
    dw.speculative_algorithm = SpeculativeAlgorithm.from_string("EAGLE3")
    dw.draft_runner, dw.target_worker = SimpleNamespace(model=draft), SimpleNamespace(model_runner=runner)
    worker = object.__new__(EAGLEWorkerV2)
    worker._draft_worker, worker._target_worker = dw, dw.target_worker
    store = WeightStore.create("test_sgl_hot", layout_of(served.serving_state()))
    try:
        store.publish(served.serving_state())
        swapper = plugin.draft_swapper(worker, store.names, store.layout)  # the __init__ hook
        rt = plugin.Runtime(
            staging=None, ring=None, store=store, swapper=swapper, leader=True, handoff_dir=None, keep_previous=True
        )
        assert not hasattr(dw, "hot_token_id") and swapper.hot is None
        dw.init_token_map()  # alloc_memory_pool, later in the scheduler's init
        dw.init_lm_head()
        hot = dw.hot_token_id
        assert hot is not None and draft.model.embed_tokens.weight is target.embed  # SGLang shared it
        new = Eagle3Head.load(reference_head_path(), torch.zeros(0))
        new.set_draft_vocab(torch.arange(1000, 1000 + c.draft_vocab_size))
        version = store.publish(new.serving_state())
        assert rt.swap_to(version)
        assert dw.hot_token_id is hot and swapper.hot.data_ptr() == hot.data_ptr()
        assert torch.equal(hot, new.hot_ids) and not torch.equal(new.hot_ids, served.hot_ids)
        assert torch.equal(rt._previous_hot, new.hot_ids)  # the kept copy follows the swap
        assert torch.equal(draft.lm_head.weight, new.lm_head.weight)
    finally:
        store.close()


# ---- launcher ---------------------------------------------------------------------------------------
def test_launcher_server_args_equal_sglang_parse_of_equivalent_command_line(tmp_path):
    from sglang.srt.server_args import prepare_server_args

    from aurora_sgl.launch_server import build_parser, resolve_defaults
    from aurora_sgl.sglang_backend.launcher import build_server_args

    model = reference_model_path()
    ours = [
        "--backend",
        "sglang",
        "--model-path",
        model,
        "--port",
        "31234",
        "--mem-fraction-static",
        "0.7",
        "--speculative-draft-model-path",
        reference_head_path(),
        "--trainer-device",
        "cuda:1",
        "--tool-call-parser",  # SGLang's own flags pass through: tool calling is its API server's
        "qwen25",
    ]
    args, passthrough = build_parser().parse_known_args(ours)
    resolve_defaults(args)
    assert passthrough == ["--mem-fraction-static", "0.7", "--tool-call-parser", "qwen25"]
    got = build_server_args(args, passthrough, args.speculative_draft_model_path)
    want = prepare_server_args(
        [
            "--model-path",
            model,
            "--speculative-algorithm",
            "EAGLE3",
            "--speculative-draft-model-path",
            reference_head_path(),
            "--speculative-num-steps",
            "5",
            "--speculative-eagle-topk",
            "1",
            "--speculative-num-draft-tokens",
            "6",
            "--dtype",
            "bfloat16",  # the target's: the draft is built alike (issue 13)
            "--host",
            "127.0.0.1",
            "--port",
            "31234",
            "--log-level",
            "info",
            "--mem-fraction-static",
            "0.7",
            "--tool-call-parser",
            "qwen25",
        ]
    )
    assert got == want
    assert (
        got.speculative_algorithm,
        got.speculative_num_steps,
        got.speculative_eagle_topk,
        got.speculative_num_draft_tokens,
        got.mem_fraction_static,
        got.tool_call_parser,
    ) == ("EAGLE3", 5, 1, 6, 0.7, "qwen25")
    # overridable: an explicit topk leaves SGLang's own draft-token default alone
    args, passthrough = build_parser().parse_known_args(
        ours[:-4] + ["--speculative-num-steps", "3", "--speculative-eagle-topk", "4"]
    )
    resolve_defaults(args)
    got = build_server_args(args, passthrough, reference_head_path())
    assert (got.speculative_num_steps, got.speculative_eagle_topk) == (3, 4)
    assert not got.speculative_adaptive  # SGLang's default
    # --speculative-adaptive is SGLang's own adaptive speculation (its config passes through)
    config = tmp_path / "adaptive.json"
    config.write_text(json.dumps({"1": {"candidate_steps": [0, 2, 6]}}))
    args, passthrough = build_parser().parse_known_args(
        ours[:-4] + ["--speculative-adaptive", "--speculative-adaptive-config", str(config)]
    )
    resolve_defaults(args)
    got = build_server_args(args, passthrough, reference_head_path())
    assert (got.speculative_adaptive, got.speculative_adaptive_config) == (True, str(config))


def test_sglang_backend_without_cuda_is_one_line_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = subprocess.run(
        [sys.executable, "-m", "aurora_sgl.launch_server", "--backend", "sglang"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "CUDA" in p.stderr and "Traceback" not in p.stderr


def test_embedded_backend_still_rejects_unknown_flags():
    from aurora_sgl.launch_server import main

    with pytest.raises(SystemExit) as e:
        main(["--mem-fraction-static", "0.7"])
    assert e.value.code == 2


def test_trainer_handoff_waits_for_sglangs_graphs(tmp_path):
    # Issue 13: the handoff (which starts the trainer) was written in the worker's __init__, before
    # SGLang sized its KV pool and captured graphs: a trainer on that GPU allocated meanwhile.
    import inspect

    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.plugins.hook_registry import HookRegistry

    order = inspect.getsource(Scheduler.init_model_worker)
    assert order.index("self.maybe_init_draft_worker()") < order.index("self.init_memory_pools()")
    assert order.index("self.init_memory_pools()") < order.index("self.init_all_cuda_graphs()")
    saved = {k: list(v) for k, v in HookRegistry._hooks.items()}
    try:
        plugin.register()
        hooks = HookRegistry._hooks.get(plugin.HOOK_TARGETS["graphs"], [])
        assert any(fn is plugin._after_cuda_graphs for _, fn, _ in hooks), hooks
    finally:
        HookRegistry._hooks.clear()
        HookRegistry._hooks.update(saved)
    rt = plugin.Runtime(staging=None, ring=None, store=None, swapper=None, leader=True, handoff_dir=str(tmp_path))
    rt.pending_handoff = (str(tmp_path), {"ring": {"name": "r"}, "store": {"name": "s"}})
    plugin.set_runtime(rt)
    try:
        assert not (tmp_path / plugin.HANDOFF).exists()  # built in __init__: nothing for the trainer yet
        plugin._after_cuda_graphs(None, object.__new__(Scheduler))
        written = json.loads((tmp_path / plugin.HANDOFF).read_text())
        assert written["ring"] == {"name": "r"} and rt.pending_handoff is None
    finally:
        plugin.set_runtime(None)


def test_every_dp_replica_captures_into_its_own_ring_and_hands_it_to_the_trainer(tmp_path):
    # Issue 13: only DP replica 0 captured. Each replica's leader builds its own stagings and ring;
    # replica 1 hands its ring over as ring_dp1.json (never the trainer's handoff), after SGLang's
    # graphs like replica 0, and the trainer's reader gets both replicas' verify steps.
    from sglang.srt.managers.scheduler import Scheduler

    from aurora_sgl.sglang_backend.replica import Replica, create_capture, handoff_of
    from aurora_sgl.transport.handoff import read_handoff
    from aurora_sgl.transport.ring_set import RingSet

    k = 3  # _step's draft steps
    sizes = dict(device=torch.device("cpu"), dtype=torch.float32, max_requests=8, prefill_rows=16, ring_records=16)
    assert create_capture(Replica(1, 1), k, A, H, **sizes) == (None, None, None)  # not a leader
    store = WeightStore.create("test_dp_ws", layout_of({"w": torch.zeros(2)}))
    store.publish({"w": torch.ones(2)})
    runtimes, rings, reader = {}, [], None
    try:
        for dp in (0, 1):
            replica = Replica(dp, 0)
            staging, prefill, ring = create_capture(replica, k, A, H, **sizes)
            assert staging is not None and prefill is not None
            rings.append(ring)
            name, spec = handoff_of(replica, ring, {"store": store.spec()} if replica.owner else {})
            rt = plugin.Runtime(
                staging=staging,
                prefill=prefill,
                ring=ring,
                store=store if replica.owner else None,
                swapper=None,
                leader=True,
                handoff_dir=str(tmp_path),
                replica=replica,
            )
            rt.pending_handoff = (str(tmp_path), spec, name)
            runtimes[dp] = rt
        assert rings[0].name.startswith("aurora_ring_") and rings[1].name.startswith("aurora_ring_dp1_")
        scheduler = object.__new__(Scheduler)
        plugin.set_runtime(runtimes[1])  # replica 1 may finish its graphs first
        plugin._after_cuda_graphs(None, scheduler)
        assert sorted(os.listdir(tmp_path)) == ["ring_dp1.json"]
        plugin.set_runtime(runtimes[0])
        plugin._after_cuda_graphs(None, scheduler)
        assert sorted(os.listdir(tmp_path)) == ["handoff.json", "ring_dp1.json"]
        main = read_handoff(str(tmp_path / "handoff.json"))
        assert main["ring"]["name"] == rings[0].name and main["store"]["name"] == store.name
        assert read_handoff(str(tmp_path / "ring_dp1.json"))["ring"]["name"] == rings[1].name
        reader = RingSet(SignalRing.attach(main["ring"]), str(tmp_path))
        for dp, rt in runtimes.items():
            worker, batch, result, _ = _step(1, seed=dp)
            for req in batch.reqs:
                req.rid = f"dp{dp}-{req.rid}"
            plugin.set_runtime(rt)
            plugin._around_verify(lambda w, b, result=result: result, worker, batch)
            rt._last_export = float("-inf")  # export counters in this iteration
            rt.iteration()
        assert runtimes[1].store is not None  # replica 1 attached replica 0's store
        got = reader.read(64)
        assert [(r.source, r.request_id) for r in sorted(got, key=lambda r: r.source)] == [
            (dp, f"dp{dp}-req-{i}") for dp in (0, 1) for i in range(3)
        ]
        counters = sorted(p.name for p in tmp_path.glob("counters_*.json"))
        assert counters == ["counters_dp0_rank0.json", "counters_dp1_rank0.json"]
        assert json.loads((tmp_path / "counters_dp1_rank0.json").read_text())["records_written"] == 3
    finally:
        plugin.set_runtime(None)
        if reader is not None:
            reader.close()
        for rt in runtimes.values():
            if rt.store is not None and rt.store is not store:
                rt.store.close()
        for seg in [*rings, store]:
            seg.close()


def test_every_hook_target_exists_in_sglang():
    # SGLang's HookRegistry only logs a target it cannot resolve: a renamed method would silently
    # switch capture or swaps off (issue 17).
    import importlib

    for name, target in plugin.HOOK_TARGETS.items():
        module, _, attr_path = target.partition(".srt.")
        parts = ("sglang.srt." + attr_path).split(".")
        obj, i = None, len(parts)
        while i > 0:
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                i -= 1
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
            assert obj is not None, f"hook target {name}: {target} does not exist in this SGLang"
        assert callable(obj), (name, target)


# ---- the hooks as SGLang applies them ---------------------------------------------------------------
_OUR_HOOKS = {
    "load_model": plugin._after_load_model,
    "worker_init": plugin._after_worker_init,
    "verify": plugin._around_verify,
    "prefill": plugin._around_prefill,
    "pull": plugin._after_pull,
    "recv": plugin._after_recv,
    "iteration": plugin._after_iteration,
    "graphs": plugin._after_cuda_graphs,
    "accepted": plugin._after_accepted,
}


def _owner_and_raw(target: str):
    import pkgutil

    owner_path, attr = target.rsplit(".", 1)
    owner = pkgutil.resolve_name(owner_path)
    return owner, attr, (owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr))


@contextmanager
def _hooks_applied_by_sglang():
    """`register()` then `HookRegistry.apply_hooks()`, as SGLang's `load_plugins` does. Yields the
    originals (target -> (owner, attr, original function)) of the targets that resolve; on exit
    puts every original back, also where `_propagate_patch` rebound a module global to a wrapper,
    and restores the registry, so later tests see SGLang unhooked."""
    import sys
    import types

    from sglang.srt.plugins.hook_registry import HookRegistry

    originals = {}
    for target in plugin.HOOK_TARGETS.values():
        try:
            originals[target] = _owner_and_raw(target)
        except (ImportError, AttributeError, KeyError):
            pass  # a renamed target: left for the caller's assertion to report
    saved_hooks = {k: list(v) for k, v in HookRegistry._hooks.items()}
    saved_patched = set(HookRegistry._patched)
    HookRegistry.reset()
    try:
        plugin.register()
        HookRegistry.apply_hooks()  # logs, never raises, when a target does not resolve
        yield originals
    finally:
        wrappers = {}
        for owner, attr, original in originals.values():
            now = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            if now is not original:
                wrappers[id(now)] = (now, original)
                setattr(owner, attr, original)
        for mod in list(sys.modules.values()):
            if isinstance(mod, types.ModuleType):
                for name, value in list(vars(mod).items()):
                    if id(value) in wrappers and value is wrappers[id(value)][0]:
                        setattr(mod, name, wrappers[id(value)][1])
        HookRegistry.reset()
        HookRegistry._hooks.update(saved_hooks)
        HookRegistry._patched.update(saved_patched)


def _assert_every_target_wrapped(originals) -> None:
    """Each of the plugin's targets now holds SGLang's wrapper around the original, built with our
    hook; a target SGLang could not resolve (it only logged it) fails here."""
    assert set(_OUR_HOOKS) == set(plugin.HOOK_TARGETS)
    for name, target in plugin.HOOK_TARGETS.items():
        assert target in originals, f"hook target {name}: {target} does not exist in this SGLang"
        owner, attr, original = originals[target]
        now = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        assert now is not original, f"hook target {name}: {target} was not wrapped"
        assert getattr(now, "__wrapped__", None) is original, (name, target)
        cells = [c.cell_contents for c in (now.__closure__ or ())]
        assert _OUR_HOOKS[name] in cells, f"hook target {name}: wrapped, but not with our hook"


def test_sglang_applies_every_hook_and_a_renamed_target_is_caught(monkeypatch):
    from sglang.srt.managers.scheduler import Scheduler

    kept = {"ingest": Scheduler.__dict__["ingest_requests"]}  # in a container: see the plugin docstring
    with _hooks_applied_by_sglang() as originals:
        _assert_every_target_wrapped(originals)
    assert Scheduler.__dict__["ingest_requests"] is kept["ingest"]  # restored for later tests

    # SGLang renames a method: HookRegistry logs and goes on; the assertion must not
    monkeypatch.setitem(plugin.HOOK_TARGETS, "pull", plugin.HOOK_TARGETS["pull"] + "_renamed")
    with _hooks_applied_by_sglang() as originals:
        with pytest.raises(AssertionError, match="hook target pull"):
            _assert_every_target_wrapped(originals)


@pytest.mark.parametrize("blocker", [False, True], ids=["plain", "input_blocker"])
def test_marker_rides_sglangs_real_recv_requests(blocker, tmp_path):
    """The swap marker's trip through SGLang's own `SchedulerRequestReceiver.recv_requests` on a
    single-rank scheduler, hooks applied by SGLang's HookRegistry: a real tokenizer request arrives
    on a real ZMQ socket (SGLang's msgpack wire format); `_pull_raw_reqs` (our after-hook appends
    the marker) -> the input blocker (SGLang's, when colocated batch generation turns it on) ->
    `_broadcast_reqs_across_ranks` -> the request post-processing -> our after-hook on
    `recv_requests` takes the marker out and arms the swap. At TP size 1 SGLang skips the
    broadcast (`tp_size != 1`); the marker crossing ranks and the ranks' MIN agreement are
    tests/test_sglang_tp_agreement.py's, with two gloo processes."""
    from array import array
    from types import SimpleNamespace

    import torch.distributed as dist
    import zmq
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput, sock_send
    from sglang.srt.managers.scheduler_components.request_receiver import SchedulerRequestReceiver
    from sglang.srt.managers.scheduler_input_blocker import SchedulerInputBlocker
    from sglang.srt.runtime_context import get_context, get_parallel
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(model_path=reference_model_path(), device="cpu")
    get_context().set_server_args(server_args)
    own_group = not dist.is_initialized()  # the input blocker all-reduces over the world group
    if own_group:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    zctx = zmq.Context()
    tokenizer = zctx.socket(zmq.PULL)  # as Scheduler's ipc channels: PULL from tokenizer and RPC
    tokenizer.bind(f"ipc://{tmp_path}/tokenizer")
    rpc = zctx.socket(zmq.PULL)
    rpc.bind(f"ipc://{tmp_path}/rpc")
    sender = zctx.socket(zmq.PUSH)
    sender.connect(f"ipc://{tmp_path}/tokenizer")
    receiver = SchedulerRequestReceiver(
        recv_from_tokenizer=tokenizer,
        recv_from_rpc=rpc,
        recv_skipper=None,
        input_blocker=SchedulerInputBlocker(noop=False) if blocker else None,
        mm_receiver=None,
        server_args=server_args,
        model_config=SimpleNamespace(is_multimodal=False),
        max_recv_per_poll=-1,
        stream_output=lambda *a, **kw: None,
        get_last_batch=lambda: None,
    )
    kept = {"recv": SchedulerRequestReceiver.__dict__["recv_requests"]}
    store = WeightStore.create("test_sgl_recv", {"w": ((4,), torch.float32)})
    rank0 = dict(pp_rank=0, attn_tp_rank=0, attn_cp_rank=0, world_group=SimpleNamespace(cpu_group=dist.group.WORLD))
    try:
        store.publish({"w": torch.ones(4)})
        rt = plugin.Runtime(staging=None, ring=None, store=store, swapper=None, leader=True, handoff_dir=None)
        assert rt.draft_version == 1
        plugin.set_runtime(rt)

        def request(rid):
            return TokenizedGenerateReqInput(
                rid=rid,
                input_text="hi",
                input_ids=array("i", [1, 2, 3]),
                input_embeds=None,
                mm_inputs=None,
                token_type_ids=None,
                sampling_params=SamplingParams(max_new_tokens=4),
                return_logprob=False,
                logprob_start_len=-1,
                top_logprobs_num=0,
                token_ids_logprob=None,
                stream=False,
            )

        def iteration(expect: int):
            """One scheduler iteration's receive, once `expect` requests are waiting."""
            deadline = time.monotonic() + 10
            while tokenizer.poll(0) == 0 and expect and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.02)  # the rest of a burst sent together
            return receiver.recv_requests()

        with _hooks_applied_by_sglang(), get_parallel().override(**rank0):
            assert getattr(SchedulerRequestReceiver.recv_requests, "__wrapped__", None) is not None
            sock_send(sender, request("before"))
            got = iteration(1)  # nothing new in the store: no marker
            assert [r.rid for r in got] == ["before"] and rt.pending_version == 0
            version = store.publish({"w": torch.full((4,), 2.0)})
            sock_send(sender, request("same-iteration"))
            got = iteration(1)
            assert [type(r) for r in got] == [TokenizedGenerateReqInput]  # the marker never leaves
            assert got[0].rid == "same-iteration" and list(got[0].input_ids) == [1, 2, 3]
            assert version == 2 and rt.pending_version == version and rt.counters["markers"] == 1
            assert iteration(0) == []  # an empty iteration: the marker is not sent twice
            assert rt.pending_version == version and rt.counters["markers"] == 1
        assert SchedulerRequestReceiver.__dict__["recv_requests"] is kept["recv"]  # unhooked again
    finally:
        plugin.set_runtime(None)
        store.close()
        zctx.destroy(linger=0)
        if own_group:
            dist.destroy_process_group()
