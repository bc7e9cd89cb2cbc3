"""The SGLang plugin: `register()` is the `sglang.srt.plugins` entry point `aurora_sgl`.

SGLang's `load_plugins()` calls it in every process that loads plugins (CLI, engine, each
scheduler); it only registers hooks with SGLang's `HookRegistry`, which applies them. The hooks do
nothing unless the launcher set `AURORA_SGL_HANDOFF_DIR` (so installing the package never changes a
plain `sglang serve`). With it, in every scheduler process:

  ModelRunner.load_model (after)     target only: its LogitsProcessor keeps `last_hidden_states`
                                     (the final hidden state; see capture.py), before graph capture
  EAGLEWorkerV2.__init__ (after)     build this rank's runtime: the swapper; the leader (TP rank 0
                                     of each DP replica) also its staging and CUDA signal ring,
                                     replica 0's leader the weight store too (publishes version 1)
  Scheduler.init_all_cuda_graphs (after)
                                     leaders: hand over the trainer handoff (replica 0) or the
                                     replica's ring (`ring_dp<d>.json`), once SGLang's memory is set
  EAGLEWorkerV2.verify (around)      enqueue the step's accepted rows into the staging slots
  EAGLEWorkerV2._forward_prefill_batch (around)
                                     enqueue the computed prompt rows (prefill.py)
  SchedulerRequestReceiver._pull_raw_reqs (after)
                                     leader only: when the store holds a newer verified version,
                                     append a `SwapMarker` to the requests it pulled
  SchedulerRequestReceiver.recv_requests (after)
                                     every rank: take the markers out of the received list
  Scheduler.ingest_requests (after)  every rank, once per iteration: drain staging into the ring,
                                     carry out the marked rollback decisions, swap to the marked
                                     version, export counters
  SchedulerBatchResultProcessor._resolve_spec_v2_tokens (after)
                                     leader: each decode step's accepted drafts per request (on the
                                     host already), for the live rollback's judge

Live rollback, as in the embedded engine and with its policy (online/rollback.py): the leader
judges each new version on those accept lengths against the confirmed version's, re-measured on the
same traffic before it rolls back; its decisions ride the same markers, so every TP rank restores
the same copy in the same iteration. `AURORA_SGL_ROLLBACK=0` turns it off and with it the two
copies of the draft it keeps on each rank (allocated in the worker's __init__, before SGLang sizes
its KV pool; for an 8B target's head about 0.85 GB each in bf16).

It aborts nothing and pauses nothing: the swap is an in-place copy enqueued on the stream the
forwards run on (`forward_stream_of`) after the trainer's publish event, between two forwards.

Tensor parallelism -- every rank swaps at the same iteration: SGLang's receiver broadcasts what TP
rank 0 pulled to all TP ranks every iteration (`broadcast_pyobj` over the TP CPU group), so the
marker rides a broadcast that happens anyway and reaches every rank in the same iteration. Each
rank copies (its own shards) from the store; then, only in that iteration, the ranks all-reduce
(MIN) a success flag over the TP CPU group. If any rank's copy failed (the trainer began a second
publish into the source buffer), every rank restores its previous weights from a kept copy, so the
ranks never serve different hot-token maps (rank-local draft ids would desynchronise the TP verify
forward). Not covered: data-parallel attention (markers would ride a per-DP-group broadcast) and
pipeline parallelism (draft on the last stage only) -- the runtime refuses to start there.

Data parallelism (`--dp-size N`) -- every replica's accepted chains reach the trainer: each
replica's leader captures into a ring of its own, on its own GPU (one writer per ring); replica 0's
handoff names its ring and the store, every other replica hands its ring over as `ring_dp<d>.json`
in the same directory, and the trainer reads them all (replica.py, transport/ring_set.py). Every
leader polls the one store and marks swaps for its own TP group; replicas swap, and judge versions
on their own traffic (live rollback), independently.

Read from the 0.5.23 wheel beyond ../shared/DESIGN.md (and corrections to it):
  * the hot-token map the draft forward indexes is `EagleDraftWorker.hot_token_id`, a device copy
    of `LlamaForCausalLMEagle3.hot_token_id` made in `init_lm_head`, after the worker's __init__;
    a swap must write the worker's tensor, so the swapper looks it up at each swap;
  * a draft config without `draft_vocab_size` makes SGLang borrow the target's lm_head
    (`load_lm_head_from_target`), so "the draft has its own lm_head" is not always true: the
    swapper skips any parameter whose storage a target parameter owns;
  * the final hidden state needs no extra capture kernel: `LogitsProcessor.keep_last_hidden_states`
    (see capture.py); `_finalize_accept_tree_path` compacts `hidden_states` and predict only;
  * `HookRegistry._propagate_patch` rebinds every module global that *is* the original function,
    in any module (tests keep originals in containers).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from aurora_sgl.online.rollback import CONFIRM, KEEP, PROBE, ROLLBACK, RollbackPolicy
from aurora_sgl.online.version_check import SUPERSEDED, refusal_reason

from .capture import CaptureStaging, VerifyStep, drain_in_order
from .prefill import PrefillStaging, PrefillStep
from .replica import HANDOFF, Replica, create_capture, handoff_of
from .swap_facts import SwapFacts

log = logging.getLogger("aurora_sgl.sglang")

ENV_DIR = "AURORA_SGL_HANDOFF_DIR"
ENV_RING_RECORDS = "AURORA_SGL_RING_RECORDS"
ENV_STAGING_REQUESTS = "AURORA_SGL_STAGING_REQUESTS"
ENV_PREFILL_ROWS = "AURORA_SGL_PREFILL_ROWS"  # prompt rows one prefill staging slot holds (< 0: off)
ENV_ROLLBACK = "AURORA_SGL_ROLLBACK"  # "0": no live rollback, and no copies of the draft kept for it

_W = "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2"
_R = "sglang.srt.managers.scheduler_components.request_receiver.SchedulerRequestReceiver"
HOOK_TARGETS = {
    "load_model": "sglang.srt.model_executor.model_runner.ModelRunner.load_model",
    "worker_init": f"{_W}.__init__",
    "verify": f"{_W}.verify",
    "prefill": f"{_W}._forward_prefill_batch",
    "pull": f"{_R}._pull_raw_reqs",
    "recv": f"{_R}.recv_requests",
    "iteration": "sglang.srt.managers.scheduler.Scheduler.ingest_requests",
    "graphs": "sglang.srt.managers.scheduler.Scheduler.init_all_cuda_graphs",
    "accepted": "sglang.srt.managers.scheduler_components.batch_result_processor."
    "SchedulerBatchResultProcessor._resolve_spec_v2_tokens",
}

_RUNTIME: Runtime | None = None


@dataclass(frozen=True)
class SwapMarker:
    """Rides SGLang's per-iteration request broadcast from TP rank 0 to every TP rank: swap to a
    store `version` (op "swap"), or carry out a rollback-policy decision about `version` (op
    PROBE, KEEP or CONFIRM of online/rollback.py) on every rank's own copies."""

    version: int
    op: str = "swap"


def register() -> None:
    """Entry point: register the hooks (SGLang applies them after all plugins ran)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGETS["load_model"], _after_load_model, HookType.AFTER)
    HookRegistry.register(HOOK_TARGETS["worker_init"], _after_worker_init, HookType.AFTER)
    HookRegistry.register(HOOK_TARGETS["verify"], _around_verify, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS["prefill"], _around_prefill, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS["pull"], _after_pull, HookType.AFTER)
    HookRegistry.register(HOOK_TARGETS["recv"], _after_recv, HookType.AFTER)
    HookRegistry.register(HOOK_TARGETS["iteration"], _after_iteration, HookType.AFTER)
    HookRegistry.register(HOOK_TARGETS["graphs"], _after_cuda_graphs, HookType.AFTER)
    HookRegistry.register(HOOK_TARGETS["accepted"], _after_accepted, HookType.AFTER)


def enabled() -> bool:
    return bool(os.environ.get(ENV_DIR))


def runtime() -> Runtime | None:
    return _RUNTIME


def set_runtime(rt: Runtime | None) -> None:
    global _RUNTIME
    _RUNTIME = rt


# ---- hooks ----------------------------------------------------------------------------------------
def _after_load_model(result, model_runner, *args, **kwargs):
    if enabled() and not getattr(model_runner, "is_draft_worker", False):
        lp = getattr(model_runner.model, "logits_processor", None)
        if lp is not None:
            lp.keep_last_hidden_states = True
    return None


def _after_worker_init(result, worker, *args, **kwargs):
    if not enabled() or getattr(worker, "_draft_worker", None) is None:
        return None
    try:
        set_runtime(Runtime.for_worker(worker))
    except Exception as e:  # serving goes on without online training
        log.error("aurora_sgl: online training disabled in this scheduler: %s", e)
        set_runtime(Runtime.broken_rank(_tp_cpu_group()))
    return None


def _tp_cpu_group():
    """The TP CPU group when TP > 1, else None (also when SGLang cannot tell)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        par = get_parallel()
        return par.tp_group.cpu_group if par.tp_size > 1 else None
    except Exception:
        return None


def _around_verify(original, worker, batch, *args, **kwargs):
    result = original(worker, batch, *args, **kwargs)
    rt = _RUNTIME
    if rt is not None and rt.policy is not None and not batch.forward_mode.is_idle():
        # The same result object reaches the output processor (`_after_accepted`) with the accept
        # lengths on the host, one iteration later under overlap: it carries who drafted them.
        result.aurora_drafted_by = (rt.draft_version, worker.speculative_num_steps)
        rt.recent_reqs = [batch.reqs]  # a reference: the ids are read only when a probe starts
    if rt is not None and rt.staging is not None:
        try:
            step = verify_step(worker, batch, result, rt.draft_version)
            if step is not None:
                rt.staging.capture(step)
        except Exception as e:
            log.error("aurora_sgl: capture disabled after an error: %s", e)
            rt.staging = None
    return result


def _around_prefill(original, worker, batch, *args, **kwargs):
    # `_draft_extend_for_prefill` rebinds batch.input_ids to the shifted draft inputs: read the
    # extend tokens and the per-request layout before the call, the next tokens after it.
    rt = _RUNTIME
    before = None
    if rt is not None and rt.policy is not None and not batch.forward_mode.is_idle():
        rt.recent_reqs.append(batch.reqs)
    if rt is not None and rt.prefill is not None and not batch.forward_mode.is_idle():
        before = (batch.input_ids, list(batch.reqs), list(batch.prefix_lens or []), list(batch.extend_lens or []))
    result = original(worker, batch, *args, **kwargs)
    if before is not None and rt.prefill is not None:
        try:
            step = prefill_step(before, batch, result, rt.draft_version)
            if step is not None:
                rt.prefill.capture(step)
        except Exception as e:
            log.error("aurora_sgl: prefill capture disabled after an error: %s", e)
            rt.prefill = None
    return result


def _after_pull(result, receiver, *args, **kwargs):
    rt = _RUNTIME
    if rt is None or result is None or not rt.leader or rt.store is None or rt.broken:
        return None
    markers = rt.decide()
    return [*result, *markers] if markers else None


def _after_recv(result, receiver, *args, **kwargs):
    if not result or not any(isinstance(r, SwapMarker) for r in result):
        return None
    rt = _RUNTIME
    if rt is not None:
        markers = [r for r in result if isinstance(r, SwapMarker)]
        rt.pending_ops += [m for m in markers if m.op != "swap"]
        rt.pending_version = max([rt.pending_version] + [m.version for m in markers if m.op == "swap"])
    return [r for r in result if not isinstance(r, SwapMarker)]


def _after_accepted(result, processor, batch_result, batch, *args, **kwargs):
    """Each decode step's accepted drafts per request, on the host (SGLang copied them for its own
    output processing): the live evidence the rollback policy judges versions on."""
    rt = _RUNTIME
    drafted_by = getattr(batch_result, "aurora_drafted_by", None)
    if rt is None or rt.policy is None or drafted_by is None:
        return None
    try:
        version, drafted = drafted_by
        accepted = batch_result.num_correct_drafts_per_req_cpu or []
        for req, n in zip(batch.reqs, accepted):
            rt.policy.observe(version, req.rid, drafted, n)
    except Exception as e:  # the judge goes blind; serving and swaps go on
        log.error("aurora_sgl: live rollback disabled after an error: %s", e)
        rt.policy = None
    return None


def _after_cuda_graphs(result, scheduler, *args, **kwargs):
    """SGLang has sized its memory pools and captured its graphs: now the trainer may start."""
    rt = _RUNTIME
    if rt is not None and rt.pending_handoff is not None:
        try:
            path = _write_handoff(*rt.pending_handoff)
            log.info("aurora_sgl: %s written for the trainer", path)
        except Exception as e:  # serving goes on without online training
            log.error("aurora_sgl: could not write the trainer handoff: %s", e)
        rt.pending_handoff = None
    return None


def _after_iteration(result, scheduler, *args, **kwargs):
    rt = _RUNTIME
    if rt is not None:
        try:
            rt.iteration(forward_stream_of(scheduler))
        except Exception as e:  # serving goes on; swaps stop here and, at the next marker, everywhere
            log.error("aurora_sgl: online training disabled after an error: %s", e)
            rt.broken = True
    return None


def forward_stream_of(scheduler):
    """The stream the scheduler runs its forwards on: the swap is queued there, so it lands between
    two forwards. With overlap scheduling `run_batch` enters `forward_stream` (the model runner's);
    without it the worker runs on the event loop's current stream, `schedule_stream`
    (`run_event_loop` enters it), and a copy on `forward_stream` would race the next forward.
    SGLang states the same rule for its warmup in `Scheduler.init_model_worker`; its third case,
    pipeline parallelism, is refused by `Runtime.for_worker`."""
    return scheduler.forward_stream if scheduler.enable_overlap else scheduler.schedule_stream


# ---- verify outputs -> VerifyStep ---------------------------------------------------------------
def verify_step(worker, batch, result, draft_version: int = 0) -> VerifyStep | None:
    """The parts of SGLang's verify inputs/outputs the capture keeps, as views (no copies, no
    host sync). None for idle batches and when the final hidden state was not returned."""
    if batch.forward_mode.is_idle() or result.accept_lens is None:
        return None
    bs = len(batch.reqs)
    if bs == 0:
        return None
    d = worker.speculative_num_draft_tokens
    lo = result.logits_output
    spec = batch.spec_info
    draft = spec.draft_token.view(bs, d) if getattr(spec, "draft_token", None) is not None else None
    # Spec v2 keeps seq_lens = tokens in the KV cache *before* this step; the root (the last
    # committed token, not yet in the cache) sits at position seq_lens (SGLang's
    # build_tree_kernel_efficient: prompt length 7 -> root position 7; verify commits
    # seq_lens + accept_lens). After a prefill of L tokens the first root is the first sampled
    # token at L, right after the prompt's records. The capture copies the device seq_lens (what
    # verify used); the host mirror below is only the fallback.
    seq = batch.seq_lens_cpu.tolist() if batch.seq_lens_cpu is not None else [0] * bs
    return VerifyStep(
        request_ids=[r.rid for r in batch.reqs],
        positions=[int(n) for n in seq],
        root_tokens=draft[:, 0] if draft is not None else batch.input_ids.view(bs, d)[:, 0],
        draft_tokens=draft,
        predict=result.next_token_ids,
        accept_lens=result.accept_lens,
        accept_index=result.accept_index,
        aux_hidden=lo.hidden_states,
        final_hidden=lo.last_hidden_states,
        topk=worker.topk,
        draft_version=draft_version,
        num_steps=worker.speculative_num_steps,
        seq_lens=batch.seq_lens,
    )


def prefill_step(before, batch, result, draft_version: int = 0) -> PrefillStep | None:
    """The prompt rows of one extend batch (views). None when the draft extend did not run (its
    shifted inputs are our next tokens) or the batch is not a plain extend layout."""
    ids_in, reqs, prefix_lens, extend_lens = before
    ids_next = batch.input_ids
    if ids_next is None or ids_next is ids_in or len(extend_lens) != len(reqs) or len(prefix_lens) != len(reqs):
        return None
    if ids_in is None or sum(extend_lens) != ids_in.numel():  # not one row per extend token (mixed batch)
        return None
    lo = result.logits_output
    if lo is None or lo.hidden_states is None:
        return None
    return PrefillStep(
        request_ids=[r.rid for r in reqs],
        starts=[int(p) for p in prefix_lens],
        lengths=[int(n) for n in extend_lens],
        input_ids=ids_in,
        next_ids=ids_next,
        aux_hidden=lo.hidden_states,
        final_hidden=lo.last_hidden_states,
        draft_version=draft_version,
    )


# ---- per-scheduler runtime ------------------------------------------------------------------------
class Runtime:
    """One per scheduler process. Each DP replica's leader owns its ring; replica 0's also owns
    the store (replica.py).

    Live rollback (`rollback=True`, the embedded engine's guardrail): every rank keeps two copies
    of its draft tensors, the confirmed version's (also what a failed swap restores) and, while
    the confirmed version is re-measured, the suspect's; the leader's `policy` judges versions on
    the accept lengths SGLang's output processor hands `_after_accepted`, and its decisions reach
    every rank as markers, like swaps."""

    def __init__(
        self,
        *,
        staging: CaptureStaging | None,
        ring,
        store,
        swapper,
        leader: bool,
        handoff_dir: str | None,
        tp_group=None,
        keep_previous: bool | None = None,
        side_stream=None,
        prefill: PrefillStaging | None = None,
        rollback: bool = False,
        policy: RollbackPolicy | None = None,
        replica: Replica | None = None,
    ):
        self.staging, self.prefill, self.ring, self.store, self.swapper = staging, prefill, ring, store, swapper
        self.leader, self.handoff_dir, self.tp_group = leader, handoff_dir, tp_group
        self.side_stream = side_stream
        self.replica = replica or Replica()  # names its counters file
        self.draft_version = store.version if store is not None else 0
        self.pending_version = 0
        self.pending_ops: list[SwapMarker] = []  # rollback decisions to carry out this iteration
        self._refused_through = 0
        self._previous = self._live = self._suspect = None
        self._previous_hot = self._suspect_hot = None
        self.rollback = rollback and swapper is not None
        self.policy = policy if self.rollback else None
        # Leader: the request lists of the last verify batch and of the prefills since (`running`).
        self.recent_reqs: list = []
        if keep_previous is None:
            # With TP a failed swap must be undone on every rank (one hot map for all); alone, a
            # half-copied head only costs acceptance until the next marker, so no second copy --
            # unless the rollback keeps one anyway.
            keep_previous = tp_group is not None
        if (keep_previous or self.rollback) and swapper is not None:
            self._live = swapper.live_tensors()
            self._previous = [t.detach().clone() for t in self._live]
            self._keep_hot()
        if self.rollback:  # allocated here, before SGLang sizes its KV pool
            self._suspect = [t.detach().clone() for t in self._live]
        self.confirmed_version = self.draft_version
        self.counters = {
            "swaps": 0,
            "failed_swaps": 0,
            "refused": 0,
            "records_written": 0,
            "markers": 0,
            "probes": 0,
            "rollbacks": 0,
        }
        self._last_export = 0.0
        self.broken = False  # no more swaps; with TP this rank still answers every swap's agreement
        # (directory, spec[, file name]): written once SGLang's graphs are captured
        self.pending_handoff: tuple | None = None

    @classmethod
    def broken_rank(cls, tp_group=None) -> Runtime:
        """A rank whose runtime could not be built: it swaps nothing but joins each swap's MIN
        all-reduce with BROKEN, so its TP peers neither hang nor serve a head it does not have."""
        rt = cls(staging=None, ring=None, store=None, swapper=None, leader=False, handoff_dir=None, tp_group=tp_group)
        rt.broken = True
        return rt

    # -- construction inside SGLang --------------------------------------------------------------
    @classmethod
    def for_worker(cls, worker) -> Runtime:
        from sglang.srt.runtime_context import get_parallel, get_server_args

        from aurora_sgl.engine.draft_head import Eagle3Head, default_aux_layer_ids
        from aurora_sgl.transport.signal_ring import ring_capacity
        from aurora_sgl.transport.weight_store import WeightStore

        par = get_parallel()
        if par.pp_size != 1 or getattr(par, "attn_dp_enabled", False):
            raise RuntimeError("pipeline parallelism and DP attention are not supported by the swap protocol")
        sa = get_server_args()
        dw = worker._draft_worker
        model = dw.draft_runner.model
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        head = Eagle3Head.load(sa.speculative_draft_model_path, torch.zeros(0))
        state = head.serving_state()
        layout = {n: (tuple(t.shape), dtype if t.is_floating_point() else t.dtype) for n, t in state.items()}
        swapper = draft_swapper(worker, list(state), layout)
        handoff_dir = os.environ[ENV_DIR]
        replica = Replica.of(par)
        k = max_draft_steps(worker)
        target_layers = worker._target_worker.model_runner.model.config.num_hidden_layers
        aux_ids = head.config.aux_layer_ids or default_aux_layer_ids(target_layers)  # SGLang's default
        aux_dim = model.model.fc.weight.shape[1]  # len(aux layers) x the target's hidden size
        hidden = aux_dim // len(aux_ids)  # final_hidden is the target's
        tp_group = par.tp_group.cpu_group if par.tp_size > 1 else None
        rollback = os.environ.get(ENV_ROLLBACK, "1") != "0"
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Every replica's leader captures into its own ring; replica 0's also owns the store.
        staging, prefill, ring = create_capture(
            replica,
            k,
            aux_dim,
            hidden,
            device=device,
            dtype=dtype,
            max_requests=int(os.environ.get(ENV_STAGING_REQUESTS) or min(sa.max_running_requests or 128, 256)),
            prefill_rows=int(os.environ.get(ENV_PREFILL_ROWS) or 2048),  # a negative value: no prompt capture
            ring_records=int(os.environ.get(ENV_RING_RECORDS) or ring_capacity(k + 1, aux_dim, hidden, k)),
        )
        store, owner_fields = None, {}
        if replica.owner:
            store = WeightStore.create("aurora_weights", layout, device=device)
            store.publish(state)  # version 1: what SGLang loaded from the same checkpoint
            owner_fields = {
                "store": store.spec(),
                "model_path": sa.model_path,
                "draft_path": sa.speculative_draft_model_path,
                "aux_layer_ids": aux_ids,
                "draft_vocab_size": head.config.draft_vocab_size,
                "tp_size": par.tp_size,
                "swap_mode": swapper.mode,
                "skipped": swapper.skipped,
                "scheduler_pid": os.getpid(),
            }
        if ring is not None:
            log.info("aurora_sgl: DP replica %d ring ready on %s (swap: %s)", replica.dp_rank, device, swapper.mode)
        rt = cls(
            staging=staging,
            ring=ring,
            store=store,
            swapper=swapper,
            leader=replica.leader,
            handoff_dir=handoff_dir,
            tp_group=tp_group,
            side_stream=side,
            prefill=prefill,
            rollback=rollback,
            policy=RollbackPolicy(k, 1) if rollback and replica.leader else None,
            replica=replica,
        )
        rt.draft_version = rt.confirmed_version = 1
        # The trainer starts when the handoff appears. Written here, before SGLang sizes its KV
        # pool and captures its graphs, a trainer on the same GPU would allocate while SGLang
        # measures free memory: the hook after `init_all_cuda_graphs` writes it (and a replica's
        # ring file, for the same reason).
        if ring is not None:
            name, spec = handoff_of(replica, ring, owner_fields)
            rt.pending_handoff = (handoff_dir, spec, name)
        return rt

    # -- leader: decide what to swap to -----------------------------------------------------------
    def poll_new_version(self) -> int:
        """The newest published version if it verifies (checksum, finite), else 0. Runs on a side
        stream so its host syncs never wait for the forward stream."""
        polled = self.store.poll(max(self.draft_version, self._refused_through, self.pending_version))
        if polled is None:
            return 0
        version, views = polled
        with torch.cuda.stream(self.side_stream) if self.side_stream is not None else nullcontext():
            reason = refusal_reason(self.store, version, views)
        if reason == SUPERSEDED:
            return 0
        if reason is not None:
            self._refused_through = version
            self.counters["refused"] += 1
            self.store.request_rollback(version)
            log.warning("aurora_sgl: refused draft version %d (%s)", version, reason)
            return 0
        self.counters["markers"] += 1
        return version

    @property
    def running(self) -> set:
        """Requests in flight: those of the last verify batch and of the prefills since."""
        return {r.rid for reqs in self.recent_reqs for r in reqs}

    def decide(self) -> list[SwapMarker]:
        """Leader, once per iteration: the rollback policy's verdict on the serving version, then
        (unless the confirmed version is being re-measured) a newer verified store version."""
        markers = []
        if self.policy is not None:
            d = self.policy.judge(self.draft_version, lambda: self.running)
            if d is not None and d.action == ROLLBACK:  # the confirmed weights serve since the probe
                self._refused_through = max(self._refused_through, d.version)
                self.store.request_rollback(d.version)
                self.counters["rollbacks"] += 1
            elif d is not None:
                self.counters["probes"] += d.action == PROBE
                markers.append(SwapMarker(d.version, d.action))
            if self.policy.probing:
                return markers
        version = self.poll_new_version()
        if version:
            markers.append(SwapMarker(version))
        return markers

    # -- every rank, once per scheduler iteration ------------------------------------------------
    def iteration(self, forward_stream=None) -> None:
        ops, self.pending_ops = self.pending_ops, []
        if not self.broken:
            for op in ops:
                self.carry_out(op, forward_stream)
        if self.broken:
            if self.pending_version > self.draft_version:  # a marker every TP rank received
                self.swap_to(self.pending_version, forward_stream)
            return
        stagings = [st for st in (self.staging, self.prefill) if st is not None]
        if stagings and self.ring is not None:
            self.counters["records_written"] += drain_in_order(stagings, self.ring, self.side_stream)
        if self.store is None and self.handoff_dir:
            self._attach_store()
        if self.pending_version > self.draft_version and self.store is not None:
            self.swap_to(self.pending_version, forward_stream)
        now = time.monotonic()
        if self.handoff_dir and now - self._last_export >= 1.0:
            self._last_export = now
            self.export_counters(forward_stream)

    @torch.no_grad()
    def carry_out(self, op: SwapMarker, stream=None) -> None:
        """A rollback decision, on this rank's copies (no collective: each is a local copy that
        every TP rank makes in the same iteration, so all serve the same version after it)."""
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if op.op == PROBE:  # the suspect aside, the confirmed weights serve
                self._keep_hot()
                torch._foreach_copy_(self._suspect, self._live)
                if self._suspect_hot is not None:
                    self._suspect_hot.copy_(self.swapper.hot)
                self._restore()
                self.draft_version = self.pending_version = self.confirmed_version  # no swap back
                return
            if op.op == KEEP:  # the probe cleared it: the suspect serves again
                torch._foreach_copy_(self._live, self._suspect)
                if self._suspect_hot is not None:
                    self.swapper.hot.copy_(self._suspect_hot)
                self.draft_version = op.version
            if op.op in (KEEP, CONFIRM) and self.draft_version == op.version:
                torch._foreach_copy_(self._previous, self._live)  # the new restore point
                if self._previous_hot is not None:
                    self._previous_hot.copy_(self.swapper.hot)
                self.confirmed_version = op.version

    def _keep_hot(self) -> None:
        """The kept copy of the hot map, once the worker has one (SGLang creates it after the
        worker's __init__, where this runtime is built)."""
        if self._previous is not None and self._previous_hot is None and self.swapper.bind_hot() is not None:
            self._previous_hot = self.swapper.hot.detach().clone()
            if self.rollback:
                self._suspect_hot = self.swapper.hot.detach().clone()

    def swap_to(self, version: int, stream=None) -> bool:
        """Swap every TP rank to `version`, or none. A rank's result is COPIED, RETRY (the trainer
        rewrote the source meanwhile: try at the next marker) or BROKEN (an error, or a rank
        without a runtime); the ranks agree on the worst (MIN), restore the previous weights unless
        all copied, and after BROKEN all stop swapping -- in the same iteration, so none waits in
        an all-reduce the others left."""
        status = BROKEN
        if not self.broken:
            try:
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    self._keep_hot()  # before the swap writes the map
                status = COPIED if self.store.copy_with(self.swapper.swap, version, stream) else RETRY
            except Exception as e:
                log.error("aurora_sgl: swap to version %d failed: %s", version, e)
        if self.tp_group is not None:
            status = agree(status, self.tp_group)
        if status != COPIED:
            self.counters["failed_swaps"] += 1
            if self.rollback:  # the restore point is the confirmed version
                self.draft_version = self.confirmed_version
            self.pending_version = self.draft_version
            if not self.broken:
                try:
                    self._restore(stream)
                except Exception as e:
                    log.error("aurora_sgl: restoring the previous draft failed: %s", e)
                    status = BROKEN
            if status == BROKEN and not self.broken:
                log.error("aurora_sgl: online training disabled on every rank (a swap failed)")
                self.broken = True
            return False
        self.draft_version = version
        self.pending_version = version
        self.counters["swaps"] += 1
        if self._previous is not None and not self.rollback:  # the kept copy follows the swap
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                torch._foreach_copy_(self._previous, self._live)
                if self._previous_hot is not None:
                    self._previous_hot.copy_(self.swapper.hot)
        return True

    def _restore(self, stream=None) -> None:
        if self._previous is None:
            return
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            torch._foreach_copy_(self._live, self._previous)
            if self._previous_hot is not None:
                self.swapper.hot.copy_(self._previous_hot)

    def _attach_store(self) -> None:
        path = os.path.join(self.handoff_dir, HANDOFF)
        if not os.path.exists(path):
            return
        from aurora_sgl.transport.handoff import read_handoff
        from aurora_sgl.transport.weight_store import WeightStore

        self.store = WeightStore.attach(read_handoff(path)["store"])

    def stats(self) -> dict:
        out = dict(self.counters, draft_version=self.draft_version)
        if self.rollback:
            out["confirmed_version"] = self.confirmed_version
        if self.policy is not None:
            out["live_accept_length"] = self.policy.measured()
        if self.staging is not None:
            out.update(
                captured=self.staging.captured,
                staging_drops=self.staging.staging_drops,
                capture_skipped=self.staging.skipped,
                capture_max_batch=self.staging.max_batch,
            )
        if self.prefill is not None:
            out.update(
                prefill_captured=self.prefill.captured,
                prefill_staging_drops=self.prefill.staging_drops,
                prefill_rows_dropped=self.prefill.rows_dropped,
                prefill_skipped=self.prefill.skipped,
            )
        if self.ring is not None:
            out.update({f"ring_{k}": v for k, v in self.ring.stats().items()})
        return out

    _swap_facts: SwapFacts | None = None

    def swap_facts(self, stream=None) -> dict:
        """What the live draft holds (swap_facts.py; the device check reads it), refreshed on the
        forward `stream` when the served draft changed. An error here turns it off, never serving."""
        if self._swap_facts is None:
            self._swap_facts = SwapFacts()
        if self._swap_facts.error:
            return {"swap_facts_error": self._swap_facts.error}
        try:
            return self._swap_facts.observe(self, stream)
        except Exception as e:
            log.error("aurora_sgl: swap facts turned off after an error: %s", e)
            self._swap_facts.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            return {"swap_facts_error": self._swap_facts.error}

    def export_counters(self, stream=None) -> None:
        """counters_dp<D>_rank<T>.json in the handoff dir, replaced atomically; the launcher reads
        it, and the device check its `swap_facts`."""
        path = os.path.join(self.handoff_dir, self.replica.counters_file)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(dict(self.stats(), **self.swap_facts(stream)), f)
        os.replace(tmp, path)


BROKEN, RETRY, COPIED = 0, 1, 2  # one rank's swap result; the ranks agree on the smallest


def agree(status: int, group) -> int:
    """MIN of every rank's swap result over the TP CPU group (gloo)."""
    import torch.distributed as dist

    flag = torch.tensor([status])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return int(flag.item())


def max_draft_steps(worker) -> int:
    """The most drafts a verify of this worker can carry: its step count, or with SGLang's adaptive
    speculation (`--speculative-adaptive`) the largest of its candidate step counts -- the
    staging, the ring and the judge are sized and measured against it."""
    controller = getattr(worker, "adaptive_controller", None)
    candidates = list(controller.candidate_steps) if controller is not None else []
    return max([worker.speculative_num_steps, *candidates])


def draft_swapper(worker, names, layout):
    """The swapper for an `EAGLEWorkerV2`, built in its __init__ hook. The hot map is read from the
    draft worker at each swap: `EagleDraftWorker.hot_token_id` only exists after the scheduler's
    `alloc_memory_pool -> init_lm_head`, and that tensor (not the model's) is what drafting indexes."""
    from .swap import DraftSwapper

    dw = worker._draft_worker
    target_params = list(worker._target_worker.model_runner.model.parameters())
    return DraftSwapper(
        dw.draft_runner.model, lambda: getattr(dw, "hot_token_id", None), names, layout, shared=target_params
    )


def _write_handoff(directory: str, spec: dict, name: str = HANDOFF) -> str:
    from aurora_sgl.transport.handoff import write_handoff

    path = os.path.join(directory, name)
    write_handoff(spec, path)
    return path
