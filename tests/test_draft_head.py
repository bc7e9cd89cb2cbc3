"""EAGLE-3 checkpoint layout: our saves, hand-built SGLang-named checkpoints, and bad shapes."""

import json

import pytest
import torch
from safetensors.torch import save_file

from aurora_sgl.engine.draft_head import ARCHITECTURE, Eagle3Config, Eagle3Head

H, V, VD, KVH, HEADS, INTER = 32, 60, 24, 2, 4, 48


def _embed():
    torch.manual_seed(0)
    return torch.nn.Embedding(V, H)


def _logits(head, seed=5):
    g = torch.Generator().manual_seed(seed)
    aux = torch.randn(1, 7, 3 * H, generator=g)
    toks = torch.randint(0, V, (1, 7), generator=g)
    kc = torch.zeros(1, KVH, 16, H // HEADS)
    h = head.forward_cached(
        aux, toks, torch.arange(7).unsqueeze(0), kc, torch.zeros_like(kc), torch.zeros(1, dtype=torch.long)
    )
    return head.logits(h)


def _config():
    return Eagle3Config(
        hidden_size=H,
        intermediate_size=INTER,
        num_attention_heads=HEADS,
        num_key_value_heads=KVH,
        vocab_size=V,
        draft_vocab_size=VD,
        aux_layer_ids=[1, 3, 4],
    )


def test_save_load_roundtrip_gives_identical_logits(tmp_path):
    emb = _embed()
    head = Eagle3Head(_config(), emb)
    head.reset_parameters(seed=3)
    head.set_draft_vocab(torch.randperm(V)[:VD])
    head.save(tmp_path / "head")
    cfg = json.loads((tmp_path / "head" / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE] and cfg["draft_vocab_size"] == VD
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    loaded = Eagle3Head.load(tmp_path / "head", emb)
    assert torch.equal(_logits(head), _logits(loaded))
    assert torch.equal(head.hot_ids, loaded.hot_ids)
    assert "embed_tokens.weight" not in head.state_dict()


def _sglang_named_tensors(seed=11):
    """Tensor names exactly as SGLang's LlamaForCausalLMEagle3.load_weights reads them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    hd = H // HEADS
    hot = torch.randperm(V, generator=g)[:VD].sort().values
    return {
        "fc.weight": r(H, 3 * H),
        "midlayer.input_layernorm.weight": 1 + r(H),
        "midlayer.hidden_norm.weight": 1 + r(H),
        "midlayer.post_attention_layernorm.weight": 1 + r(H),
        "midlayer.self_attn.q_proj.weight": r(HEADS * hd, 2 * H),
        "midlayer.self_attn.k_proj.weight": r(KVH * hd, 2 * H),
        "midlayer.self_attn.v_proj.weight": r(KVH * hd, 2 * H),
        "midlayer.self_attn.o_proj.weight": r(H, HEADS * hd),
        "midlayer.mlp.gate_proj.weight": r(INTER, H),
        "midlayer.mlp.up_proj.weight": r(INTER, H),
        "midlayer.mlp.down_proj.weight": r(H, INTER),
        "norm.weight": 1 + r(H),
        "lm_head.weight": r(VD, H),
        "d2t": hot - torch.arange(VD),  # offsets, as EAGLE-3 / SGLang store them
        "t2d": torch.zeros(V, dtype=torch.bool).index_fill_(0, hot, True),
        "embed_tokens.weight": r(V, H),  # some checkpoints carry it; the target's is used
    }


def _write_handbuilt(path, tensors):
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLMEagle3"],
                "model_type": "llama",
                "hidden_size": H,
                "intermediate_size": INTER,
                "num_attention_heads": HEADS,
                "num_key_value_heads": KVH,
                "num_hidden_layers": 1,
                "vocab_size": V,
                "draft_vocab_size": VD,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "max_position_embeddings": 2048,
                "tie_word_embeddings": False,
                "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 4]},
            }
        )
    )
    save_file(tensors, str(path / "model.safetensors"))


def test_handbuilt_sglang_checkpoint_loads_like_our_own(tmp_path):
    emb = _embed()
    tensors = _sglang_named_tensors()
    _write_handbuilt(tmp_path / "hand", tensors)
    loaded = Eagle3Head.load(tmp_path / "hand", emb)
    # The same weights put in by attribute path must give bit-identical logits.
    manual = Eagle3Head(_config(), emb)
    with torch.no_grad():
        for name, t in tensors.items():
            if name in ("d2t", "t2d", "embed_tokens.weight"):
                continue
            obj = manual
            for part in name.split(".")[:-1]:
                obj = getattr(obj, part)
            getattr(obj, name.split(".")[-1]).copy_(t)
    manual.set_draft_vocab(tensors["d2t"] + torch.arange(VD))
    assert torch.equal(_logits(loaded), _logits(manual))
    assert torch.equal(loaded.t2d, tensors["t2d"])
    assert torch.equal(loaded.embed_weight, emb.weight.detach())  # never the checkpoint's copy
    # And saving it again reproduces the checkpoint's tensors.
    loaded.save(tmp_path / "again")
    from safetensors.torch import load_file

    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    for name, t in tensors.items():
        if name != "embed_tokens.weight":
            assert torch.equal(again[name], t), name


def test_wrong_shape_names_the_tensor(tmp_path):
    tensors = _sglang_named_tensors()
    tensors["midlayer.self_attn.k_proj.weight"] = torch.zeros(7, 2 * H)
    _write_handbuilt(tmp_path / "bad", tensors)
    with pytest.raises(ValueError, match=r"midlayer\.self_attn\.k_proj\.weight.*\(7, 64\)"):
        Eagle3Head.load(tmp_path / "bad", _embed())


def test_missing_tensor_and_wrong_architecture(tmp_path):
    tensors = _sglang_named_tensors()
    del tensors["fc.weight"]
    _write_handbuilt(tmp_path / "missing", tensors)
    with pytest.raises(ValueError, match="fc.weight"):
        Eagle3Head.load(tmp_path / "missing", _embed())
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="not an EAGLE-3"):
        Eagle3Head.load(tmp_path / "llama", _embed())


def test_published_pytorch_model_bin_loads_like_safetensors(tmp_path):
    """Issue 13, item 9: published EAGLE-3 heads often ship `pytorch_model.bin` only."""
    emb = _embed()
    tensors = _sglang_named_tensors()
    _write_handbuilt(tmp_path / "st", tensors)
    _write_handbuilt(tmp_path / "bin", tensors)
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    torch.save({"lr": 1.0}, tmp_path / "bin" / "training_args.bin")  # skipped, as SGLang skips it
    from_bin = Eagle3Head.load(tmp_path / "bin", emb)
    assert torch.equal(_logits(from_bin), _logits(Eagle3Head.load(tmp_path / "st", emb)))
    assert torch.equal(from_bin.t2d, tensors["t2d"])


def test_bin_that_would_run_code_is_refused_and_no_weights_is_named(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("loaded a pickle that runs code",))

    tensors = _sglang_named_tensors()
    _write_handbuilt(tmp_path / "evil", tensors)
    (tmp_path / "evil" / "model.safetensors").unlink()
    torch.save({**tensors, "x": Payload()}, tmp_path / "evil" / "pytorch_model.bin")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        Eagle3Head.load(tmp_path / "evil", _embed())
    (tmp_path / "evil" / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"\*\.safetensors or \*\.bin"):
        Eagle3Head.load(tmp_path / "evil", _embed())
