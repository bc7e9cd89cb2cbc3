"""The TTT unroll must reproduce, position by position, what the head computes at serving time
with its KV cache; the objectives must match their definitions."""

import torch

from aurora_sgl.engine.draft_head import Eagle3Config, Eagle3Head
from aurora_sgl.engine.unroll import ttt_logits
from aurora_sgl.training.losses import draft_loss


def _head(vocab=50, hidden=32, draft_vocab=20, seed=0):
    cfg = Eagle3Config(
        hidden_size=hidden,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        draft_vocab_size=draft_vocab,
        aux_layer_ids=[0, 1, 2],
    )
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(vocab, hidden)
    head = Eagle3Head(cfg, emb).double()
    head.reset_parameters(seed)
    object.__setattr__(head, "embed_weight", emb.weight.detach().double())
    head.set_draft_vocab(torch.randperm(vocab)[:draft_vocab])
    return head


def test_ttt_unroll_matches_serving_drafts():
    head = _head()
    T, steps = 12, 4
    gen = torch.Generator().manual_seed(1)
    aux = torch.randn(1, T, 3 * 32, generator=gen, dtype=torch.float64)
    nxt = torch.randint(0, 50, (1, T), generator=gen)
    unrolled = ttt_logits(head, aux, nxt, steps)
    cfg = head.config
    for last in range(T - steps):
        kc = torch.zeros(1, cfg.num_key_value_heads, T + 2, cfg.head_dim, dtype=torch.float64)
        vc = torch.zeros_like(kc)
        slots = torch.zeros(1, dtype=torch.long)
        pos = torch.arange(last + 1).unsqueeze(0)
        h = head.forward_cached(aux[:, : last + 1], nxt[:, : last + 1], pos, kc, vc, slots)[:, -1:]
        for k in range(steps):
            if k:
                p = torch.tensor([[last + k]])
                h = head.forward_cached(h, nxt[:, last + k : last + k + 1], p, kc, vc, slots)
            torch.testing.assert_close(head.logits(h)[0, 0], unrolled[k][0, last + k], rtol=1e-9, atol=1e-9)


def test_kl_objective_matches_naive_definition():
    head = _head()
    T = 6
    logits = [torch.randn(2, T, 20, dtype=torch.float64) for _ in range(3)]
    target = torch.randn(2, T, 50, dtype=torch.float64)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, :2] = False
    loss, _ = draft_loss(logits, target, head.hot_ids, mask, "kl", step_weight=0.8)
    naive = 0.0
    for k, lg in enumerate(logits):
        terms = []
        for b in range(2):
            for t in range(T):
                if not mask[b, t] or t < k:
                    continue
                p = torch.softmax(target[b, t, head.hot_ids], -1)
                q = torch.softmax(lg[b, t], -1)
                terms.append(float((p * (p.log() - q.log())).sum()))
        naive += 0.8**k * sum(terms) / len(terms)
    assert abs(float(loss) - naive) < 1e-9


def test_accept_objective_is_acceptance_probability():
    head = _head()
    lg = torch.randn(1, 4, 20, dtype=torch.float64)
    target = torch.randn(1, 4, 50, dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, _ = draft_loss([lg], target, head.hot_ids, mask, "accept")
    p = torch.softmax(target, -1)
    q = torch.zeros(1, 4, 50, dtype=torch.float64)
    q[..., head.hot_ids] = torch.softmax(lg, -1)
    alpha = torch.minimum(p, q).sum(-1)
    assert abs(float(loss) - float(-alpha.log().mean())) < 1e-9
    # A perfect draft over a target concentrated in the draft vocabulary has alpha = 1.
    tgt = torch.full((1, 4, 50), -1e4, dtype=torch.float64)
    tgt[..., head.hot_ids[3]] = 10.0
    perfect = torch.full((1, 4, 20), -1e4, dtype=torch.float64)
    perfect[..., 3] = 10.0
    loss, _ = draft_loss([perfect], tgt, head.hot_ids, mask, "accept")
    assert float(loss) < 1e-6


def test_rejected_weighting_changes_only_kl_rejected():
    head = _head()
    lg = [torch.randn(1, 5, 20, dtype=torch.float64) for _ in range(2)]
    target = torch.randn(1, 5, 50, dtype=torch.float64)
    mask = torch.ones(1, 5, dtype=torch.bool)
    mask[0, 0] = False
    w = torch.tensor([[9.0, 1.0, 5.0, 1.0, 3.0]], dtype=torch.float64)
    plain, _ = draft_loss(lg, target, head.hot_ids, mask, "kl")
    same, _ = draft_loss(lg, target, head.hot_ids, mask, "kl", position_weight=w)
    weighted, _ = draft_loss(lg, target, head.hot_ids, mask, "kl_rejected", position_weight=w)
    assert float(plain) == float(same)
    # naive: per step k, the w-weighted mean of KL(p || q) over the valid positions t >= k
    naive = 0.0
    for k, logits in enumerate(lg):
        num = den = 0.0
        for t in range(5):
            if not mask[0, t] or t < k:
                continue
            p = torch.softmax(target[0, t, head.hot_ids], -1)
            q = torch.softmax(logits[0, t], -1)
            num += float(w[0, t]) * float((p * (p.log() - q.log())).sum())
            den += float(w[0, t])
        naive += 0.8**k * num / den
    assert abs(float(weighted) - naive) < 1e-9
    assert abs(float(plain) - naive) > 1e-3  # the weights matter here


def test_ttt_unroll_on_sequences_shorter_than_the_unroll():
    # A 2-position batch with 5 unroll steps (a request of one prompt token and two generated ones)
    # crashed the trainer; causality means each step's logits on the short batch are the first
    # positions of the same computation on a longer one.
    head = _head()
    gen = torch.Generator().manual_seed(3)
    aux = torch.randn(1, 9, 3 * 32, generator=gen, dtype=torch.float64)
    nxt = torch.randint(0, 50, (1, 9), generator=gen)
    long = ttt_logits(head, aux, nxt, 5)
    for t in (1, 2, 4):
        short = ttt_logits(head, aux[:, :t], nxt[:, :t], 5)
        for k in range(5):
            torch.testing.assert_close(short[k], long[k][:, :t], rtol=1e-9, atol=1e-9)


def test_train_step_clips_the_gradient_norm_and_steps_adamw():
    # README: "AdamW with clip 2.5" -- the clip is applied to the step, not just a default (issue 17).
    from aurora_sgl.training.batches import HeadBatch, Sequence, train_step

    head = _head().float()
    object.__setattr__(head, "embed_weight", head.embed_weight.float())
    gen = torch.Generator().manual_seed(5)
    seqs = [
        Sequence(
            torch.randint(0, 50, (9,), generator=gen),
            torch.randn(9, 96, generator=gen) * 50,
            torch.randn(9, 32, generator=gen) * 50,
            0,
        )
        for _ in range(3)
    ]
    lm_w = torch.randn(50, 32, generator=gen)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    stats = train_step(head, opt, lm_w, HeadBatch.from_sequences(seqs), unroll=3, clip=0.01)
    total = torch.norm(torch.stack([p.grad.norm() for p in head.parameters() if p.grad is not None]))
    assert stats["grad_norm"] > 0.01 and float(total) <= 0.01 * (1 + 1e-4), (stats["grad_norm"], float(total))
    assert any(not torch.equal(before[n], p) for n, p in head.named_parameters())
