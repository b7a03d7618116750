"""Label masks (``labels=``, ``label_pairs=``) of topk and pairs_above against brute force."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

import dask_cosim as dcs
from dask_cosim._select import EXCLUDED_KEY, label_excluded, select_topk, topk_block


def rng(seed):
    return np.random.default_rng(seed)


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def allowed(la, lb, mode):
    return la[:, None] != lb[None, :] if mode == "different" else la[:, None] == lb[None, :]


def check_topk(vals, idx, s, ok, k, atol=1e-5):
    """Each row: the best ``k`` allowed entries (values; indices up to ties), then NaN / -1."""
    for r in range(s.shape[0]):
        cand = np.flatnonzero(ok[r])
        best = cand[np.argsort(-s[r, cand], kind="stable")][:k]
        got = idx[r, : len(best)]
        assert ok[r, got].all(), (r, got)
        np.testing.assert_allclose(vals[r, : len(best)], s[r, best], atol=atol)
        np.testing.assert_allclose(vals[r, : len(best)], s[r, got], atol=atol)
        assert (idx[r, len(best) :] == -1).all() and np.isnan(vals[r, len(best) :]).all()


@pytest.mark.parametrize("mode", ["different", "same"])
@pytest.mark.parametrize("chunks", [(60, 60), (16, 16), (7, 13), "auto"])
def test_pairs_above_self_with_labels(mode, chunks):
    a = rng(1).standard_normal((60, 6))
    labels = rng(2).integers(0, 5, 60)
    s = unit(a) @ unit(a).T
    got = dcs.pairs_above(a, threshold=0.2, labels=labels, label_pairs=mode, chunks=chunks).compute()
    ok = (s >= 0.2) & np.triu(np.ones_like(s, dtype=bool)) & allowed(labels, labels, mode)
    assert set(zip(got.i, got.j, strict=True)) == set(zip(*np.nonzero(ok), strict=True))
    assert len(got) == ok.sum()


@pytest.mark.parametrize("mode", ["different", "same"])
@pytest.mark.parametrize("chunks", [(30, 40), (7, 9)])
def test_pairs_above_two_inputs_and_3d_with_labels(mode, chunks):
    a, b = rng(3).standard_normal((2, 30, 5)), rng(4).standard_normal((2, 40, 5))
    la, lb = rng(5).integers(0, 3, 30), da.from_array(rng(6).integers(0, 3, 40), chunks=11)
    got = dcs.pairs_above(a, b, threshold=0.1, labels=(la, lb), label_pairs=mode, chunks=(1, *chunks))
    got = got.compute()
    want = set()
    for k in range(2):
        s = unit(a[k]) @ unit(b[k]).T
        want |= {
            (k, i, j) for i, j in zip(*np.nonzero((s >= 0.1) & allowed(la, lb.compute(), mode)), strict=True)
        }
    assert set(zip(got.batch, got.i, got.j, strict=True)) == want


@pytest.mark.parametrize("mode", ["different", "same"])
@pytest.mark.parametrize("chunks", [(50, 50), (16, 16), (9, 20)])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_topk_self_with_labels(mode, chunks, exclude_self):
    a = rng(7).standard_normal((50, 6)).astype(np.float32)
    labels = rng(8).integers(0, 4, 50)
    labels[:3] = 99  # rows 0..2 share a label nobody else has: "same" leaves them < k neighbours
    s = unit(a.astype(np.float64)) @ unit(a.astype(np.float64)).T  # the float64 reference
    ok = allowed(labels, labels, mode)
    if exclude_self:
        np.fill_diagonal(ok, False)
    vals, idx = dask.compute(
        *dcs.topk(a, k=6, labels=labels, label_pairs=mode, chunks=chunks, exclude_self=exclude_self)
    )
    assert vals.dtype == np.float32
    check_topk(vals, idx, s, ok, 6, atol=2e-6)


@pytest.mark.parametrize("mode", ["different", "same"])
def test_topk_two_inputs_3d_with_labels(mode):
    a, b = rng(9).standard_normal((2, 20, 4)), rng(10).standard_normal((2, 35, 4))
    la, lb = rng(11).integers(0, 3, 20), rng(12).integers(0, 3, 35)
    vals, idx = dask.compute(*dcs.topk(a, b, k=5, labels=(la, lb), label_pairs=mode, chunks=(1, 8, 9)))
    for k in range(2):
        check_topk(vals[k], idx[k], unit(a[k]) @ unit(b[k]).T, allowed(la, lb, mode), 5, atol=1e-10)


@pytest.mark.parametrize("fast", [True, False])
def test_topk_block_label_mask_ranks_like_the_excluded_diagonal(fast):
    an = unit(rng(13).standard_normal((40, 5))).astype(np.float32)
    labels = np.arange(40) % 3
    keys, idx = topk_block(an, an, k=4, row_labels=labels, col_labels=labels, fast=fast)
    assert (labels[idx] != labels[:, None]).all()  # plenty of valid columns: none masked
    keys, idx = topk_block(an, an, k=40, row_labels=labels, col_labels=labels, label_pairs="same", fast=fast)
    masked = labels[idx] != labels[:, None]
    assert (keys[masked] == EXCLUDED_KEY).all() and (keys[~masked] > EXCLUDED_KEY).all()
    np.testing.assert_array_equal(masked.sum(axis=1), 40 - np.bincount(labels)[labels])


def test_label_excluded_and_select_topk_mask():
    s = np.array([[0.9, 0.8, 0.1]])
    ex = label_excluded(np.array([1]), np.array([1, 2, 2]))
    keys, idx = select_topk(s, 2, excluded=ex)
    assert idx.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="label_pairs"):
        label_excluded(np.array([1]), np.array([1]), "other")


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.arange(9), r"labels: expected 10 labels \(one per vector\), received 9"),
        (np.zeros(10), r"labels: expected integer labels, received dtype float64"),
        (np.r_[np.zeros(9), np.nan], r"labels: received NaN labels"),
        (np.zeros((10, 1), dtype=int), r"labels: expected a 1-D integer array of length 10"),
        ((np.arange(10), np.arange(10)), r"labels: for self-similarity \(b=None\) expected one"),
        (np.array(["a"] * 10), r"expected integer labels, received dtype <U1"),
        (da.zeros(9, dtype=int, chunks=3), r"expected 10 labels"),
    ],
)
def test_bad_labels_are_value_errors_at_call_time(labels, match):
    a = np.ones((10, 3))
    with pytest.raises(ValueError, match=match):
        dcs.topk(a, k=2, labels=labels)
    with pytest.raises(ValueError, match=match):
        dcs.pairs_above(a, threshold=0.5, labels=labels)


def test_bad_labels_with_b_and_bad_label_pairs():
    a, b = np.ones((4, 3)), np.ones((5, 3))
    with pytest.raises(ValueError, match=r"labels: with b given expected a tuple \(labels_a, labels_b\)"):
        dcs.pairs_above(a, b, labels=np.arange(4))
    with pytest.raises(ValueError, match=r"labels\[1\] \(labels of b\): expected 5 labels"):
        dcs.topk(a, b, k=1, labels=(np.arange(4), np.arange(4)))
    with pytest.raises(ValueError, match=r"label_pairs: expected one of 'different', 'same'.*'diff'"):
        dcs.pairs_above(a, labels=np.arange(4), label_pairs="diff")


def test_labels_change_the_graph_name_and_provenance():
    from dask_cosim import _provenance

    a = np.ones((6, 2))
    plain = dcs.pairs_above(a, threshold=0.5)
    masked = dcs.pairs_above(a, threshold=0.5, labels=np.arange(6))
    same = dcs.pairs_above(a, threshold=0.5, labels=np.arange(6), label_pairs="same")
    assert len({plain._name, masked._name, same._name}) == 3
    assert _provenance.lookup(same._name)["label_pairs"] == "same"
    assert "labels" not in _provenance.lookup(plain._name)
    assert len(masked.compute()) == 15 and len(same.compute()) == 6  # no diagonal; only the diagonal
