"""Copy a weight-store version into SGLang's live EAGLE-3 draft module, in place.

SGLang's `LlamaForCausalLMEagle3` fuses what our head (and the checkpoint) keeps apart:
`qkv_proj` = rows [q; k; v], `gate_up_proj` = rows [gate; up], and prefixes everything but the
lm_head with `model.` / `layers.0`. The plan below is built once from those names: a list of
(destination view into a live parameter, store tensor name) pairs, so a swap is one
`torch._foreach_copy_` plus one add for the hot-token map -- no allocation, no parameter object
replaced (CUDA graphs captured their pointers). The test checks the plan against SGLang's own
`load_weights` on the real class.

Skipped on purpose:
  * any draft parameter whose storage is shared with the target (the embedding, and the lm_head
    when SGLang borrows the target's): overwriting it would change the target itself;
  * `t2d` (SGLang does not use it).
`d2t` (offsets) becomes the hot-token map `hot = d2t + arange`, written into the tensor the draft
worker indexes (`EagleDraftWorker.hot_token_id`), together with the weights: a head and its
vocabulary never go live apart. That tensor does not exist yet when the plugin builds the swapper
(SGLang creates it in `alloc_memory_pool -> init_lm_head`, after the worker's `__init__`), so the
swapper is given a getter and binds the map at each swap, to whatever tensor the worker holds then.

Tensor parallelism: with a TP-sharded draft the fused rows are shards, the plan's shapes no longer
match, and `DraftSwapper` falls back to SGLang's own per-parameter weight loaders (same in-place
copies into the same storage, sharded exactly as at startup; a few Python calls per tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

# our (checkpoint) name -> (SGLang parameter, row block within it: fused index or None)
_FUSED = {
    "midlayer.self_attn.q_proj.weight": ("model.layers.0.self_attn.qkv_proj.weight", 0),
    "midlayer.self_attn.k_proj.weight": ("model.layers.0.self_attn.qkv_proj.weight", 1),
    "midlayer.self_attn.v_proj.weight": ("model.layers.0.self_attn.qkv_proj.weight", 2),
    "midlayer.mlp.gate_proj.weight": ("model.layers.0.mlp.gate_up_proj.weight", 0),
    "midlayer.mlp.up_proj.weight": ("model.layers.0.mlp.gate_up_proj.weight", 1),
}
NOT_WEIGHTS = ("d2t", "t2d")


def sglang_name(name: str) -> str:
    """Where SGLang keeps an unfused checkpoint tensor (`load_weights`' own renaming)."""
    if name.startswith("lm_head."):
        return name
    return "model." + name.replace("midlayer.", "layers.0.")


class PlanMismatch(ValueError):
    """The draft module's parameters are not shaped like one unsharded head (e.g. TP > 1)."""


def build_plan(
    model: nn.Module, layout: Mapping[str, tuple[Sequence[int], torch.dtype]], shared_ptrs: set[int] = frozenset()
) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """(destination views, store names in the same order, skipped SGLang parameter names)."""
    params = dict(model.named_parameters())
    dst, src, skipped = [], [], []
    blocks: dict[str, list[tuple[int, str]]] = {}
    for name, (shape, _) in layout.items():
        if name in NOT_WEIGHTS:
            continue
        if name in _FUSED:
            target, idx = _FUSED[name]
            blocks.setdefault(target, []).append((idx, name))
            continue
        pname = sglang_name(name)
        if pname not in params:
            raise PlanMismatch(f"SGLang's draft module has no parameter {pname} for {name}")
        p = params[pname]
        if tuple(p.shape) != tuple(shape):
            raise PlanMismatch(f"{pname} has shape {tuple(p.shape)}, the store's {name} has {tuple(shape)}")
        if p.data_ptr() in shared_ptrs:
            skipped.append(pname)
            continue
        dst.append(p.data)
        src.append(name)
    for pname, parts in blocks.items():
        if pname not in params:
            raise PlanMismatch(f"SGLang's draft module has no parameter {pname}")
        p = params[pname]
        parts.sort()
        rows = [layout[n][0][0] for _, n in parts]
        if p.shape[0] != sum(rows) or any(tuple(layout[n][0][1:]) != tuple(p.shape[1:]) for _, n in parts):
            raise PlanMismatch(f"{pname} has shape {tuple(p.shape)}, not the fused {[layout[n][0] for _, n in parts]}")
        if p.data_ptr() in shared_ptrs:
            skipped.append(pname)
            continue
        start = 0
        for (_, n), r in zip(parts, rows):
            dst.append(p.data[start : start + r])
            src.append(n)
            start += r
    return dst, src, skipped


class DraftSwapper:
    """Swaps store tensors into `model` (SGLang's draft module) and the draft worker's hot-token map.
    `hot_token_id` is that map, or a getter returning it (None while it does not exist);
    `shared` lists tensors owned by the target (e.g. its parameters)."""

    def __init__(
        self,
        model: nn.Module,
        hot_token_id: torch.Tensor | Callable[[], torch.Tensor | None] | None,
        store_names: Sequence[str],
        layout: Mapping[str, tuple[Sequence[int], torch.dtype]],
        shared: Sequence[torch.Tensor] = (),
    ):
        self.model = model
        self._hot_of = hot_token_id if callable(hot_token_id) else lambda: hot_token_id
        self.hot: torch.Tensor | None = None
        self.names = list(store_names)
        shared_ptrs = {t.data_ptr() for t in shared}
        self.params = dict(model.named_parameters())
        try:
            self.dst, src, self.skipped = build_plan(model, layout, shared_ptrs)
            self._index = [self.names.index(n) for n in src]
            self.mode = "plan"
        except PlanMismatch as e:
            self.dst, self._index = [], []
            self.skipped = [n for n, p in self.params.items() if p.data_ptr() in shared_ptrs]
            self.mode = f"loader ({e})"
        self._d2t = self.names.index("d2t") if "d2t" in self.names else None
        self._d2t_size = layout["d2t"][0][0] if self._d2t is not None else 0
        self.bind_hot()

    def bind_hot(self) -> torch.Tensor | None:
        """Bind the tensor the worker indexes now (None: it has none yet, or the draft borrows the
        target's full vocabulary). A map of another size than the store's d2t is refused."""
        hot = self._hot_of()
        if hot is not None and hot is not self.hot and self._d2t is not None:
            if hot.numel() != self._d2t_size:
                raise ValueError(f"hot-token map has {hot.numel()} entries, the store's d2t {self._d2t_size}")
            self._arange = torch.arange(hot.numel(), dtype=hot.dtype, device=hot.device)
        self.hot = hot
        return hot

    def live_tensors(self) -> list[torch.Tensor]:
        """Every tensor a swap writes (the hot map aside): what a rollback must restore."""
        if self.mode == "plan":
            return list(self.dst)
        skip = set(self.skipped)
        return [p.data for n, p in self.params.items() if n not in skip and n != "model.embed_tokens.weight"]

    @torch.no_grad()
    def swap(self, views: Sequence[torch.Tensor]) -> None:
        """Copy the store's `views` (store order) in; enqueued on the current stream."""
        if self.mode == "plan":
            torch._foreach_copy_(self.dst, [views[i] for i in self._index])
        else:
            self._swap_with_loaders(views)
        hot = self.bind_hot()
        if self._d2t is not None and hot is not None:
            torch.add(views[self._d2t].to(hot.dtype), self._arange, out=hot)

    def _swap_with_loaders(self, views: Sequence[torch.Tensor]) -> None:
        skip = set(self.skipped)
        weights = [(n, v) for n, v in zip(self.names, views) if n not in NOT_WEIGHTS]
        hot = getattr(self.model, "hot_token_id", None)
        # load_weights would route d2t into a new `hot_token_id` object; it never sees d2t here.
        self.model.load_weights([(n, v) for n, v in weights if _loader_target(n) not in skip])
        if hot is not None:
            self.model.hot_token_id = hot


def _loader_target(name: str) -> str:
    return _FUSED[name][0] if name in _FUSED else sglang_name(name)
