"""EAGLE-3 draft head, in the checkpoint layout SGLang loads as `LlamaForCausalLMEagle3`.

Input at position t: the target's auxiliary hidden states there (cat of 3 layers, 3H, projected by
`fc`) -- or, from the second draft step on, the head's own pre-norm output -- together with the
embedding of token t+1. One decoder layer whose attention sees cat(norm(embedding), norm(hidden));
the residual stream is the hidden. Output: logits over the reduced draft vocabulary (token t+2),
mapped to target ids by `hot_ids = d2t + arange` (SGLang's convention: d2t stores offsets), and the
pre-norm hidden fed to the next draft step.

The token embedding is the target's, shared and frozen: it is held as a plain attribute, so it is
neither in `state_dict()` nor in the optimizer, and a swap can never overwrite it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from aurora_sgl.engine.attention import apply_rope, cached_attention, rope_cos_sin

ARCHITECTURE = "LlamaForCausalLMEagle3"


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's default: outputs of layers [1, L//2-1, L-4], i.e. what enters layers [2, L//2, L-3]
    (SGLang captures the input of layer id+1 for each configured id)."""
    return [1, num_layers // 2 - 1, num_layers - 4]


_DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(dtype) -> str:
    """'bfloat16' for torch.bfloat16 or 'bfloat16'; refuses dtypes a head cannot be served in."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"EAGLE-3 head dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return name


def config_dtype(config) -> str:
    """The dtype a Hugging Face config (object or dict) declares; float32 when it declares none,
    as SGLang and transformers read it."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return dtype_name(get("dtype") or get("torch_dtype") or "float32")


@dataclass
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: list[int] = field(default_factory=list)
    target_hidden_size: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    # The dtype a checkpoint's tensors and config carry: the target's. SGLang resolves a draft whose
    # config says float32 to float16 under `--dtype auto`, whatever the target's dtype, and then
    # shares the (e.g. bf16) target embedding into it: the first draft forward fails.
    dtype: str = "float32"

    def __post_init__(self):
        self.dtype = dtype_name(self.dtype)
        self.target_hidden_size = self.target_hidden_size or self.hidden_size
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in (0, vocab_size={self.vocab_size}], got {self.draft_vocab_size}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def for_target(cls, target_config, draft_vocab_size: int | None = None, aux_layer_ids=None) -> Eagle3Config:
        """A head shaped for a Hugging Face Llama-family target config."""
        rope_theta = getattr(target_config, "rope_theta", None)
        if rope_theta is None:  # transformers >= 5 keeps it under rope_parameters
            rope_theta = (getattr(target_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return cls(
            hidden_size=target_config.hidden_size,
            intermediate_size=target_config.intermediate_size,
            num_attention_heads=target_config.num_attention_heads,
            num_key_value_heads=target_config.num_key_value_heads,
            vocab_size=target_config.vocab_size,
            draft_vocab_size=min(draft_vocab_size or target_config.vocab_size, target_config.vocab_size),
            aux_layer_ids=list(aux_layer_ids or default_aux_layer_ids(target_config.num_hidden_layers)),
            head_dim=getattr(target_config, "head_dim", None),
            rms_norm_eps=target_config.rms_norm_eps,
            rope_theta=float(rope_theta),
            max_position_embeddings=target_config.max_position_embeddings,
            dtype=config_dtype(target_config),
        )

    def to_hf_json(self) -> dict:
        """config.json as SGLang's --speculative-draft-model-path expects it."""
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "target_hidden_size": self.target_hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": False,
            "torch_dtype": self.dtype,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": self.aux_layer_ids, "use_aux_hidden_state": True},
        }

    @classmethod
    def from_hf_json(cls, cfg: dict) -> Eagle3Config:
        if ARCHITECTURE not in cfg.get("architectures", []):
            raise ValueError(f"not an EAGLE-3 draft config: architectures={cfg.get('architectures')}")
        if cfg.get("num_hidden_layers", 1) != 1:
            raise ValueError(
                f"only one-layer EAGLE-3 heads are supported, got num_hidden_layers={cfg['num_hidden_layers']}"
            )
        eagle = cfg.get("eagle_config") or {}
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            vocab_size=cfg["vocab_size"],
            draft_vocab_size=cfg.get("draft_vocab_size") or cfg["vocab_size"],
            aux_layer_ids=list(eagle.get("eagle_aux_hidden_state_layer_ids") or []),
            target_hidden_size=cfg.get("target_hidden_size"),
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            hidden_act=cfg.get("hidden_act", "silu"),
            dtype=config_dtype(cfg),
        )


# Files a trainer leaves beside its weights; SGLang's loader skips them too
# (`filter_files_not_needed_for_inference`).
_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin")


def weight_files(path: str | Path) -> list[Path]:
    """The checkpoint's weight files, chosen as SGLang's loader chooses them: every *.safetensors
    when there is one, else every *.bin (published EAGLE-3 heads often ship `pytorch_model.bin`).
    Empty when the directory holds neither."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    return sorted(f for f in path.glob("*.bin") if f.name not in _NOT_WEIGHTS)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at `path`, on the CPU. `.bin` files are pickles: loaded with
    `weights_only=True`, so a file that would run code on load is refused, not executed."""
    from safetensors.torch import load_file

    files = weight_files(path)
    if not files:
        raise FileNotFoundError(f"EAGLE-3 checkpoint {path} has no *.safetensors or *.bin weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            tensors.update(load_file(str(f)))
        else:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    return tensors


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        b, t, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = _MLP(c)


class Eagle3Head(nn.Module):
    def __init__(self, config: Eagle3Config, embed_tokens: nn.Embedding | torch.Tensor):
        super().__init__()
        self.config = c = config
        self.fc = nn.Linear(len(c.aux_layer_ids) * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = _MidLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        self.set_draft_vocab(torch.arange(c.draft_vocab_size))
        weight = embed_tokens.weight if isinstance(embed_tokens, nn.Module) else embed_tokens
        object.__setattr__(self, "embed_weight", weight.detach())  # shared, frozen, not a parameter
        self.reset_parameters()

    # ---- vocabulary -------------------------------------------------------------------------
    def set_draft_vocab(self, hot_ids: torch.Tensor) -> None:
        """Choose which target tokens the draft can propose (sorted ascending, as EAGLE-3 does)."""
        hot_ids = torch.as_tensor(hot_ids, dtype=torch.long).sort().values
        if hot_ids.numel() != self.config.draft_vocab_size:
            raise ValueError(f"need {self.config.draft_vocab_size} hot ids, got {hot_ids.numel()}")
        self.d2t.copy_(hot_ids - torch.arange(hot_ids.numel()))
        self.t2d.zero_()
        self.t2d[hot_ids] = True

    @property
    def hot_ids(self) -> torch.Tensor:
        return self.d2t + torch.arange(self.d2t.numel(), device=self.d2t.device)

    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            else:
                std = 1.0 / math.sqrt(p.shape[1])
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std * 0.5)

    # ---- forward ----------------------------------------------------------------------------
    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Target aux states (3H) go through fc; the head's own states (H) pass unchanged."""
        return self.fc(hidden) if hidden.shape[-1] != self.config.hidden_size else hidden

    def layer(self, hidden: torch.Tensor, tokens: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layer on projected hidden [B, T, H] and next tokens [B, T]; `attend(x)` maps
        the 2H attention input to per-head outputs [B, heads, T, D] (cached or unrolled)."""
        m = self.midlayer
        emb = F.embedding(tokens, self.embed_weight).to(hidden.dtype)
        x = torch.cat([m.input_layernorm(emb), m.hidden_norm(hidden)], dim=-1)
        h = hidden + m.self_attn.out(attend(x))
        return h + m.mlp(m.post_attention_layernorm(h))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits from the pre-norm hidden."""
        return self.lm_head(self.norm(hidden))

    def forward_cached(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        slot_range=None,
    ) -> torch.Tensor:
        """Serving forward over [B, T] inputs with a static KV cache [slots, KVH, len, D].
        Returns the pre-norm hidden [B, T, H] (`logits()` turns the rows you need into logits)."""

        def attend(x):
            q, k, v = self.midlayer.self_attn.qkv(x, positions)
            return cached_attention(q, k, v, k_cache, v_cache, slots, positions, slot_range)

        return self.layer(self.project(hidden), tokens, attend)

    # ---- checkpoints ------------------------------------------------------------------------
    def serving_state(self) -> dict[str, torch.Tensor]:
        """Everything a swap must move, in SGLang's checkpoint names (d2t / t2d included)."""
        return dict(self.state_dict())

    def save(self, path: str | Path) -> None:
        """config.json + model.safetensors, floating tensors in `config.dtype` (what the config
        says is what the file holds; training keeps its own precision in memory)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_hf_json(), indent=2))
        dtype = self.config.torch_dtype
        tensors = {
            k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
            for k, v in self.serving_state().items()
        }
        save_file(tensors, str(path / "model.safetensors"))

    @classmethod
    def load(cls, path: str | Path, embed_tokens, device="cpu", dtype=torch.float32) -> Eagle3Head:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"EAGLE-3 checkpoint {path} has no config.json")
        config = Eagle3Config.from_hf_json(json.loads(cfg_file.read_text()))
        head = cls(config, embed_tokens)
        head.load_serving_state(read_weights(path))
        return head.to(device=device, dtype=dtype)

    def load_serving_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load SGLang-named tensors; extra keys (embed_tokens) are ignored, shapes are checked
        with an error that names the tensor."""
        own = self.state_dict()
        missing = [k for k in own if k not in tensors and k != "t2d"]
        if missing:
            raise ValueError(f"EAGLE-3 checkpoint is missing tensors: {', '.join(missing)}")
        for name, ref in own.items():
            if name not in tensors:
                continue
            got = tensors[name]
            if tuple(got.shape) != tuple(ref.shape):
                raise ValueError(
                    f"EAGLE-3 checkpoint tensor '{name}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
                )
        with torch.no_grad():
            for name, ref in own.items():
                if name in ("d2t", "t2d"):
                    continue
                ref.copy_(tensors[name])
            self.set_draft_vocab(tensors["d2t"].long() + torch.arange(self.config.draft_vocab_size))
