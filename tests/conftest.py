import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ref_tokenizer():
    from transformers import AutoTokenizer

    from aurora_sgl import reference_model_path
    return AutoTokenizer.from_pretrained(reference_model_path())


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 6, hidden: int = 64, kv_heads: int = 2,
                    bos: int = 1, eos: int = 2, pad: int = 0, init_range: float = 0.02):
    """A small random Llama for fast exactness tests (the reference model covers realism)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, initializer_range=init_range, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama(ref_tokenizer):
    t = ref_tokenizer
    return make_tiny_llama(len(t), bos=t.bos_token_id, eos=t.eos_token_id, pad=t.pad_token_id)


# Prompts the tiny head is trained on: it memorises their continuations, so with it drafts are
# often accepted and the multi-token accept paths run (a random head only exercises rejections).
PROMPTS = [f"{kind} number {i}: " + "x " * (i % 7) for i, kind in
           enumerate(["def f(x):", "Question: apples", "ROMEO:", "The module", "import os", "Tom has"] * 3)]
MAX_NEW = 24


@pytest.fixture(scope="session")
def tiny_model(ref_tokenizer):
    """Random Llama with a larger init so its greedy continuations are peaked and learnable."""
    t = ref_tokenizer
    return make_tiny_llama(len(t), bos=t.bos_token_id, eos=t.eos_token_id, pad=t.pad_token_id, init_range=0.1)


@pytest.fixture(scope="session")
def tiny_head_dir(tiny_model, ref_tokenizer, tmp_path_factory):
    from aurora_sgl.engine import Engine
    from aurora_sgl.offline_train import train_head_offline
    eng = Engine(model=tiny_model, tokenizer=ref_tokenizer, num_speculative_steps=0)
    head, _ = train_head_offline(eng, PROMPTS, max_new_tokens=MAX_NEW, steps=150, batch_size=8, lr=3e-3,
                                 unroll=4, draft_vocab_size=1024, log=lambda *_: None)
    path = tmp_path_factory.mktemp("head") / "tiny"
    head.save(path)
    return str(path)
