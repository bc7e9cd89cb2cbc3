"""The rollback policy both backends share (online/rollback.py), driven directly: what it decides
from live (drafted, accepted) steps, with no weights involved."""

from aurora_sgl.online.rollback import CONFIRM, KEEP, PROBE, ROLLBACK, RollbackPolicy


def _serve(policy, version, n, accepted, rid="r", drafted=3):
    for _ in range(n):
        policy.observe(version, rid, drafted, accepted)


def test_a_version_is_confirmed_after_a_window_and_not_before():
    p = RollbackPolicy(3, 1, window=8, margin=0.2)
    _serve(p, 1, 8, 2)
    _serve(p, 2, 7, 2)
    assert p.judge(2, list) is None
    _serve(p, 2, 1, 2)
    d = p.judge(2, list)
    assert (d.action, d.version, p.confirmed_version) == (CONFIRM, 2, 2)
    assert p.judge(2, list) is None  # confirmed versions are not judged again
    assert list(p.measured()) == ["2"]  # older versions' figures are dropped


def test_a_worse_version_is_probed_then_rolled_back_or_kept_on_the_same_traffic():
    for old_now, want in ((3, ROLLBACK), (1, KEEP)):
        p = RollbackPolicy(3, 1, window=8, margin=0.2)
        _serve(p, 1, 8, 3)  # tau 4
        _serve(p, 2, 8, 1)  # tau 2
        d = p.judge(2, lambda: ["old"])
        assert (d.action, d.version, p.probing) == (PROBE, 2, True)
        # The caller now serves version 1; a request that ran through the probe's start holds the
        # suspect's draft KV: its steps do not count, whatever they say.
        _serve(p, 1, 20, 0, rid="old")
        assert p.judge(1, list) is None
        _serve(p, 1, 8, old_now, rid="new")
        d = p.judge(1, list)
        assert (d.action, d.version, p.probing) == (want, 2, False)
        assert p.confirmed_version == (1 if want == ROLLBACK else 2)
        assert p.rollbacks == (want == ROLLBACK) and p.probes == 1


def test_steps_of_any_width_compare_as_chains_of_k():
    """Adaptive K: a step of width 1 informs position 1 only, so a version measured half on
    one-token steps and half on full chains, all accepted, measures as the full chain does."""
    p = RollbackPolicy(3, 1, window=8, margin=0.2)
    _serve(p, 1, 8, 3)
    _serve(p, 2, 4, 1, drafted=1)
    _serve(p, 2, 4, 3)
    assert p.live_accept_length(2) == p.live_accept_length(1) == 4.0  # mean(1 + accepted) would say 3
    assert p.judge(2, list).action == CONFIRM
    _serve(p, 3, 8, 0, drafted=0)  # K = 0 steps are no evidence
    assert p.live_accept_length(3) is None and p.judge(3, list) is None
