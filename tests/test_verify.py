"""Verification math against naive references, and the distributional exactness of speculative
sampling -- with biased verifiers that the same check must catch."""

import pytest
import torch

from aurora_sgl.engine.sampling import SamplingParams, probs_from_logits
from aurora_sgl.engine.verify import sample_with_uniform, verify_greedy, verify_sampling

V, K = 6, 3


def _markov(seed, sharp):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64) * sharp, dim=-1)


P = _markov(0, 1.5)  # target: P[prev] is the next-token distribution
Q = _markov(1, 1.0)  # draft, deliberately different


def correct_verifier(d, q, p, ua, un):
    return verify_sampling(d, q, p, ua, un)


def no_residual_verifier(d, q, p, ua, un):
    """Bug: on rejection resample from p instead of norm(max(p - q, 0))."""
    acc, _ = verify_sampling(d, q, p, ua, un)
    rows = torch.arange(d.shape[0])
    return acc, sample_with_uniform(p[rows, acc], un)


def mismatched_q_verifier(d, q, p, ua, un):
    """Bug: the verifier is told a different draft distribution than the drafts came from
    (e.g. temperature applied to the target but not the draft)."""
    return verify_sampling(d, torch.softmax(q.clamp(min=1e-12).log() * 2.0, -1), p, ua, un)


def bonus_from_previous_verifier(d, q, p, ua, un):
    """Bug: when every draft is accepted, the bonus token is drawn from the previous position's
    distribution instead of the one after the last draft."""
    acc, nxt = verify_sampling(d, q, p, ua, un)
    k, rows = d.shape[1], torch.arange(d.shape[0])
    wrong = sample_with_uniform(p[rows, k - 1], un)
    return acc, torch.where(acc == k, wrong, nxt)


def _first_two_tokens(verifier, n=60000, seed=0, k=K):
    """Tally (first, second) generated tokens. With k = 1 the second token is the bonus whenever the
    single draft is accepted, so the bonus's own distribution is in the tallied window."""
    g = torch.Generator().manual_seed(seed)
    prev = torch.zeros(n, dtype=torch.long)
    out = [[] for _ in range(n)]
    active = torch.arange(n)
    while active.numel():
        b = active.numel()
        drafts, qs, ps = [], [], [P[prev]]
        cur = prev
        for _ in range(k):
            qd = Q[cur]
            tok = sample_with_uniform(qd, torch.rand(b, generator=g, dtype=torch.float64))
            drafts.append(tok)
            qs.append(qd)
            ps.append(P[tok])
            cur = tok
        d = torch.stack(drafts, 1)
        acc, nxt = verifier(
            d,
            torch.stack(qs, 1),
            torch.stack(ps, 1),
            torch.rand(b, k, generator=g, dtype=torch.float64),
            torch.rand(b, generator=g, dtype=torch.float64),
        )
        keep = []
        for i, row in enumerate(active.tolist()):
            toks = d[i, : acc[i]].tolist() + [int(nxt[i])]
            out[row].extend(toks)
            if len(out[row]) < 2:
                keep.append(i)
        keep = torch.tensor(keep, dtype=torch.long)
        active = active[keep]
        prev = torch.tensor([out[r][-1] for r in active.tolist()], dtype=torch.long)
    counts = torch.zeros(V, V, dtype=torch.float64)
    for seq in out:
        counts[seq[0], seq[1]] += 1
    return counts


def _chi2(counts):
    expected = P[0].unsqueeze(1) * P * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_DF35_P0001 = 66.6  # chi-square critical value, 35 degrees of freedom, p = 0.001


@pytest.mark.parametrize("k", [1, 2, K])
def test_speculative_sampling_matches_target_distribution(k):
    assert _chi2(_first_two_tokens(correct_verifier, k=k)) < CHI2_DF35_P0001


@pytest.mark.parametrize(
    "verifier,k", [(no_residual_verifier, K), (mismatched_q_verifier, K), (bonus_from_previous_verifier, 1)]
)
def test_biased_verifiers_are_caught(verifier, k):
    assert _chi2(_first_two_tokens(verifier, k=k)) > 3 * CHI2_DF35_P0001


def test_verify_greedy_matches_naive_loop():
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        logits = torch.randn(4, K + 1, V, generator=g)
        best = logits.argmax(-1)
        drafts = torch.where(torch.rand(4, K, generator=g) < 0.7, best[:, :K], torch.randint(0, V, (4, K), generator=g))
        acc, nxt = verify_greedy(drafts, logits)
        for b in range(4):
            a = 0
            while a < K and drafts[b, a] == best[b, a]:
                a += 1
            assert acc[b] == a and nxt[b] == best[b, a]


def test_sample_with_uniform_never_picks_zero_probability():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(1000, 1)
    u = torch.linspace(0, 1 - 1e-7, 1000)
    picks = sample_with_uniform(probs, u)
    assert set(picks.tolist()) == {1, 3}


def _naive_filter(logits, temperature, top_p, top_k):
    probs = torch.softmax(logits / temperature, -1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = [], 0.0
    for rank, idx in enumerate(order):
        if top_k > 0 and rank >= top_k:
            break
        if rank > 0 and mass >= top_p:
            break
        kept.append(idx)
        mass += float(probs[idx]) / float(probs[order[:top_k]].sum() if top_k > 0 else 1.0)
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.9, -1), (1.3, 1.0, 3), (0.5, 0.6, 4)])
def test_probs_from_logits_matches_naive(temperature, top_p, top_k):
    logits = torch.randn(5, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = probs_from_logits(logits, torch.full((5,), temperature), torch.full((5,), top_p), torch.full((5,), top_k))
    for row in range(5):
        torch.testing.assert_close(
            got[row].double(), _naive_filter(logits[row], temperature, top_p, top_k), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "bad,msg",
    [
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=1.5), "max_new_tokens"),
        (dict(stop=[1, 2]), "stop"),
        (dict(stop=["x"] * 1000), "stop"),
        (dict(seed=-3), "seed"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(ignore_eos="yes"), "ignore_eos"),
    ],
)
def test_sampling_params_reject_bad_values(bad, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**bad)


def test_sampling_params_normalise_stop():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop=None).stop == ()
