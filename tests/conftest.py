import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

from helpers import MAX_NEW, PROMPTS, make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def ref_tokenizer():
    from transformers import AutoTokenizer

    from aurora_sgl import reference_model_path

    return AutoTokenizer.from_pretrained(reference_model_path())


@pytest.fixture(scope="session")
def tiny_llama(ref_tokenizer):
    t = ref_tokenizer
    return make_tiny_llama(len(t), bos=t.bos_token_id, eos=t.eos_token_id, pad=t.pad_token_id)


@pytest.fixture(scope="session")
def tiny_model(ref_tokenizer):
    """Random Llama with a larger init so its greedy continuations are peaked and learnable."""
    t = ref_tokenizer
    return make_tiny_llama(len(t), bos=t.bos_token_id, eos=t.eos_token_id, pad=t.pad_token_id, init_range=0.1)


@pytest.fixture(scope="session")
def tiny_head_dir(tiny_model, ref_tokenizer, tmp_path_factory):
    from aurora_sgl.engine.engine import Engine
    from aurora_sgl.training.offline import train_head_offline

    eng = Engine(model=tiny_model, tokenizer=ref_tokenizer, num_speculative_steps=0)
    head, _ = train_head_offline(
        eng,
        PROMPTS,
        max_new_tokens=MAX_NEW,
        steps=150,
        batch_size=8,
        lr=3e-3,
        unroll=4,
        draft_vocab_size=1024,
        log=lambda *_: None,
    )
    path = tmp_path_factory.mktemp("head") / "tiny"
    head.save(path)
    return str(path)
