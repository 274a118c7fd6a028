"""Each loss against a direct, loop-by-loop computation of its docstring formula."""

from __future__ import annotations

import math

import pytest
import torch

from tbps.losses import cmpm_loss, id_loss, itc_loss, mlm_loss, sdm_loss

EPS = 1e-8
PIDS = torch.tensor([3, 1, 3, 7, 1, 3])  # several same-identity pairs, one singleton


def _feats(b: int = 6, d: int = 5):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(b, d, generator=g, dtype=torch.float64),
            torch.randn(b, d, generator=g, dtype=torch.float64))


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _norm(a):
    return math.sqrt(_dot(a, a))


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def _kl_rows(scores, targets):
    """mean_i sum_j p_ij (log p_ij - log(q_ij + eps)), p = softmax of each score row."""
    total = 0.0
    for s_row, q_row in zip(scores, targets):
        p = _softmax(s_row)
        total += sum(pj * (math.log(pj) - math.log(qj + EPS)) for pj, qj in zip(p, q_row))
    return total / len(scores)


def _targets(pids, norm="l1"):
    b = len(pids)
    rows = []
    for i in range(b):
        same = [1.0 if pids[i] == pids[j] else 0.0 for j in range(b)]
        n = sum(same) if norm == "l1" else math.sqrt(sum(x * x for x in same))
        rows.append([x / n for x in same])
    return rows


def _cos(a, b):
    return _dot(a, b) / (_norm(a) * _norm(b))


def test_sdm_matches_loop():
    img, txt = _feats()
    scale = 50.0
    b = len(PIDS)
    pids = PIDS.tolist()
    i2t = [[scale * _cos(img[i], txt[j]) for j in range(b)] for i in range(b)]
    t2i = [[scale * _cos(txt[i], img[j]) for j in range(b)] for i in range(b)]
    q = _targets(pids)
    expected = _kl_rows(i2t, q) + _kl_rows(t2i, q)
    got = sdm_loss(img, txt, PIDS, scale)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_sdm_near_zero_when_prediction_equals_labels():
    # identical features within an identity and orthogonal across identities: with a large scale
    # the softmax puts equal mass on exactly the same-identity columns, i.e. p = q
    basis = torch.eye(4, dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 2, 2, 2])
    feats = basis[pids]
    assert sdm_loss(feats, feats, pids, 1000.0).item() == pytest.approx(0.0, abs=1e-6)
    # and positive otherwise
    img, txt = _feats()
    assert sdm_loss(img, txt, PIDS, 50.0).item() > 0.1


def test_id_matches_loop():
    g = torch.Generator().manual_seed(1)
    img_logits = torch.randn(6, 9, generator=g, dtype=torch.float64)
    txt_logits = torch.randn(6, 9, generator=g, dtype=torch.float64)

    def ce(logits):
        return sum(-math.log(_softmax(row.tolist())[int(y)]) for row, y in zip(logits, PIDS)) / len(PIDS)

    expected = (ce(img_logits) + ce(txt_logits)) / 2
    assert id_loss(img_logits, txt_logits, PIDS).item() == pytest.approx(expected, rel=1e-9)


def test_itc_matches_loop():
    img, txt = _feats()
    scale = 50.0
    b = img.shape[0]
    s = [[scale * _cos(img[i], txt[j]) for j in range(b)] for i in range(b)]
    i2t = sum(-math.log(_softmax(s[i])[i]) for i in range(b)) / b
    t2i = sum(-math.log(_softmax([s[i][j] for i in range(b)])[j]) for j in range(b)) / b
    expected = (i2t + t2i) / 2
    assert itc_loss(img, txt, scale).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_cmpm_matches_loop(norm):
    img, txt = _feats()
    b = img.shape[0]
    scale = 2.0
    i2t = [[scale * _dot(img[i], txt[j]) / _norm(txt[j]) for j in range(b)] for i in range(b)]
    t2i = [[scale * _dot(txt[i], img[j]) / _norm(img[j]) for j in range(b)] for i in range(b)]
    q = _targets(PIDS.tolist(), norm)
    expected = _kl_rows(i2t, q) + _kl_rows(t2i, q)
    got = cmpm_loss(img, txt, PIDS, logit_scale=scale, label_norm=norm)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_cmpm_label_norms_differ_and_bad_norm_rejected():
    img, txt = _feats()
    l1 = cmpm_loss(img, txt, PIDS, label_norm="l1")
    l2 = cmpm_loss(img, txt, PIDS, label_norm="l2")
    assert abs(l1.item() - l2.item()) > 1e-3
    with pytest.raises(ValueError, match="label_norm"):
        cmpm_loss(img, txt, PIDS, label_norm="l3")


def test_mlm_matches_loop_and_ignores_unpicked():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 3], labels[1, 2] = 4, 10, 0
    terms = []
    for b in range(2):
        for k in range(5):
            y = int(labels[b, k])
            if y != -100:
                terms.append(-math.log(_softmax(logits[b, k].tolist())[y]))
    expected = sum(terms) / len(terms)
    assert mlm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # logits of gathered positions (N, V) give the same value
    picked = labels != -100
    assert mlm_loss(logits[picked], labels[picked]).item() == pytest.approx(expected, rel=1e-6)


def test_mlm_without_picked_positions_is_zero_with_a_graph():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 4), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_losses_give_gradients_to_both_modalities():
    img = torch.randn(6, 5, requires_grad=True)
    txt = torch.randn(6, 5, requires_grad=True)
    total = sdm_loss(img, txt, PIDS, 50.0) + itc_loss(img, txt, 50.0) + cmpm_loss(img, txt, PIDS)
    total.backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
