from __future__ import annotations

import pytest
import torch

from hf_qn.linalg import LBFGSHistory
from tests._helpers.dense import explicit_lbfgs_matrix, random_spd


def _pairs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = random_spd(n, cond=30.0, generator=g)
    out = []
    for _ in range(k):
        s = torch.randn(n, dtype=torch.float64, generator=g)
        out.append((s, B @ s + 0.01 * s))
    return out


@pytest.mark.parametrize("gamma", ["auto", 0.7])
@pytest.mark.parametrize("m", [1, 3, 5])
def test_two_loop_and_compact_equal_explicit_matrix_at_every_fill_level(m, gamma):
    n = 9
    pairs = _pairs(n, 2 * m + 2)
    hist = LBFGSHistory(m, n, gamma=gamma, dtype=torch.float64, compute_dtype=torch.float64)
    V = torch.randn(n, 4, dtype=torch.float64)
    v = torch.randn(n, dtype=torch.float64)
    # Empty history: H = gamma0 * I.
    g0 = 1.0 if gamma == "auto" else gamma
    torch.testing.assert_close(hist.apply(v), g0 * v)
    for t, (s, y) in enumerate(pairs):
        hist.push(s, y)
        kept = pairs[max(0, t + 1 - m) : t + 1]
        gam = float(kept[-1][0] @ kept[-1][1] / (kept[-1][1] @ kept[-1][1])) if gamma == "auto" else gamma
        H = explicit_lbfgs_matrix(kept, gam, n)
        assert len(hist) == len(kept)
        torch.testing.assert_close(hist.apply(v), H @ v, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(hist.apply(V), H @ V, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(hist.two_loop(v), H @ v, rtol=1e-9, atol=1e-10)
        # Secant condition on the newest pair.
        torch.testing.assert_close(hist.apply(kept[-1][1]), kept[-1][0], rtol=1e-8, atol=1e-9)


def test_float32_storage_close_to_float64():
    n, m = 50, 6
    pairs = _pairs(n, 10, seed=2)
    h64 = LBFGSHistory(m, n, dtype=torch.float64, compute_dtype=torch.float64)
    h32 = LBFGSHistory(m, n)
    for s, y in pairs:
        h64.push(s, y)
        h32.push(s.float(), y.float())
    v = torch.randn(n, dtype=torch.float64)
    out = h32.apply(v.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), h64.apply(v), rtol=2e-3, atol=2e-4)


def test_bfloat16_storage_uses_chunked_upcast(monkeypatch):
    import hf_qn.linalg.lbfgs as mod

    monkeypatch.setattr(mod, "_CHUNK", 7)  # force several chunks
    n, m = 30, 4
    pairs = _pairs(n, 6, seed=3)
    hb = LBFGSHistory(m, n, dtype=torch.bfloat16)
    ref = LBFGSHistory(m, n, dtype=torch.float64, compute_dtype=torch.float64)
    for s, y in pairs:
        hb.push(s.float(), y.float())
        # Reference built from the same rounded vectors: the compact form must be exact for them.
        ref.push(s.bfloat16().double(), y.bfloat16().double())
    assert hb.S.dtype == torch.bfloat16
    v = torch.randn(n)
    torch.testing.assert_close(hb.apply(v).double(), ref.apply(v.double()), rtol=1e-4, atol=1e-4)


def test_state_round_trip_and_shape_check():
    n, m = 6, 3
    h = LBFGSHistory(m, n)
    for s, y in _pairs(n, 5):
        h.push(s.float(), y.float())
    sd = {k: v.clone() for k, v in h.state_dict().items()}
    h2 = LBFGSHistory(m, n)
    h2.load_state_dict(sd)
    v = torch.randn(n)
    assert torch.equal(h.apply(v), h2.apply(v))
    assert (h2.count, h2.head) == (h.count, h.head)
    with pytest.raises(ValueError, match="history_size"):
        LBFGSHistory(m + 1, n).load_state_dict(sd)


@pytest.mark.parametrize(("kw", "match"), [({"history_size": 0}, "history_size"), ({"gamma": -1.0}, "gamma"),
                                           ({"gamma": "nocedal"}, "gamma"), ({"dim": -1}, "dim")])
def test_validation(kw, match):
    args = {"history_size": 3, "dim": 4} | kw
    with pytest.raises(ValueError, match=match):
        LBFGSHistory(**args)


def test_split_history_sums_to_the_whole():
    """A history whose columns are split between two holders (as over ranks) gives the whole history's pushes
    and products once the halves' partial products are summed: write_pair/commit_push and project/finish."""
    torch.manual_seed(0)
    m, n, cut = 3, 9, 4
    whole, parts = LBFGSHistory(m, n, dtype=torch.float64, compute_dtype=torch.float64), [
        LBFGSHistory(m, k, dtype=torch.float64, compute_dtype=torch.float64) for k in (cut, n - cut)]
    empty = LBFGSHistory(m, 0, dtype=torch.float64, compute_dtype=torch.float64)  # holds none of the block
    for _ in range(m + 2):  # wraps the ring
        s = torch.randn(n, dtype=torch.float64)
        y = s + 0.1 * torch.randn(n, dtype=torch.float64)
        whole.push(s, y)
        halves = [s[:cut], s[cut:]], [y[:cut], y[cut:]]
        total = sum(h.write_pair(a, b) for h, a, b in zip(parts, *halves)) + empty.write_pair(s[:0], y[:0])
        for h in (*parts, empty):
            h.commit_push(total)
    for h in (*parts, empty):
        torch.testing.assert_close(h.SY, whole.SY, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h.YY, whole.YY, rtol=1e-12, atol=1e-12)
    v = torch.randn(n, dtype=torch.float64)
    P = parts[0].project(v[:cut]) + parts[1].project(v[cut:]) + empty.project(v[:0])
    got = torch.cat([parts[0].finish(v[:cut], P), parts[1].finish(v[cut:], P), empty.finish(v[:0], P)])
    torch.testing.assert_close(got, whole.apply(v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, whole.two_loop(v), rtol=1e-10, atol=1e-12)
