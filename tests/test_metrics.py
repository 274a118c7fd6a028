"""rank_metrics against a straightforward per-query reference and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbps.errors import TBPSError
from tbps.evaluation import rank_metrics, rank_metrics_from_scores

KEYS = ("R1", "R5", "R10", "mAP", "mINP")


def reference_metrics(similarity, query_pids, gallery_pids, ks=(1, 5, 10)) -> dict[str, float]:
    """The protocol by definition: per query, a stable descending sort, ranks of matches, AP, INP."""
    scores = np.asarray(similarity, dtype=np.float64)  # exact for float16/32 inputs
    query_pids, gallery_pids = np.asarray(query_pids), np.asarray(gallery_pids)
    hits = {k: 0 for k in ks}
    ap_total = inp_total = 0.0
    for i, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda g: (-row[g], g))  # ties: lower gallery index first
        ranks = [pos + 1 for pos, g in enumerate(order) if gallery_pids[g] == query_pids[i]]
        for k in ks:
            hits[k] += ranks[0] <= k
        ap_total += sum((n + 1) / r for n, r in enumerate(ranks)) / len(ranks)
        inp_total += len(ranks) / ranks[-1]
    q = len(scores)
    out = {f"R{k}": 100.0 * hits[k] / q for k in ks}
    out["mAP"] = 100.0 * ap_total / q
    out["mINP"] = 100.0 * inp_total / q
    return out


def assert_close(got: dict, want: dict, tol: float = 1e-9) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol), key


def random_case(num_queries: int, num_gallery: int, num_ids: int, seed: int, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    gallery_pids = rng.integers(0, num_ids, num_gallery)
    gallery_pids[: min(num_ids, num_gallery)] = np.arange(min(num_ids, num_gallery))
    query_pids = rng.choice(gallery_pids, num_queries)
    similarity = rng.standard_normal((num_queries, num_gallery)).astype(np.float32)
    # a real signal, so matches are spread from the top of the list to the bottom
    similarity += 1.5 * (query_pids[:, None] == gallery_pids[None, :])
    if decimals is not None:  # coarse rounding: many ties, between matches and non-matches too
        similarity = np.round(similarity, decimals).astype(np.float32)
    return similarity, query_pids * 7 + 3, gallery_pids * 7 + 3  # pids need not be 0..N-1


# ----------------------------------------------------------------------------- hand-computed cases

def test_single_match_at_rank_one():
    got = rank_metrics(torch.tensor([[0.9, 0.5, 0.1]]), [1], [1, 2, 3])
    assert got == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100.0, "mINP": 100.0}


def test_several_matches():
    # query pid 1: matches at ranks 1, 3, 5 -> AP = (1/1 + 2/3 + 3/5) / 3, INP = 3/5
    got = rank_metrics(np.array([[0.9, 0.8, 0.7, 0.6, 0.5]]), [1], [1, 2, 1, 3, 1], ks=(1, 2))
    assert got["R1"] == 100.0 and got["R2"] == 100.0
    assert got["mAP"] == pytest.approx(100 * (1 + 2 / 3 + 3 / 5) / 3)
    assert got["mINP"] == pytest.approx(60.0)


def test_match_last():
    got = rank_metrics(np.array([[0.9, 0.8, 0.7, 0.6]]), [1], [2, 3, 4, 1], ks=(1, 3, 4))
    assert got == pytest.approx({"R1": 0.0, "R3": 0.0, "R4": 100.0, "mAP": 25.0, "mINP": 25.0})


def test_two_queries_are_averaged():
    similarity = np.array([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3]])
    # query 0 (pid 5): match at rank 2; query 1 (pid 6): matches at ranks 1 and 3
    got = rank_metrics(similarity, [5, 6], [6, 5, 6], ks=(1, 2))
    assert got["R1"] == 50.0 and got["R2"] == 100.0
    assert got["mAP"] == pytest.approx(100 * (1 / 2 + (1 + 2 / 3) / 2) / 2)
    assert got["mINP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


@pytest.mark.parametrize("algorithm", ["auto", "threshold", "count", "sort"])
def test_ties_break_by_gallery_index(algorithm):
    equal = torch.full((1, 3), 0.5)
    # all scores equal: the ranking is the gallery order
    got = rank_metrics(equal, [1], [2, 1, 1], ks=(1,), algorithm=algorithm)
    assert got == pytest.approx({"R1": 0.0, "mAP": 100 * (1 / 2 + 2 / 3) / 2, "mINP": 100 * 2 / 3})
    got = rank_metrics(equal, [1], [1, 2, 1], ks=(1,), algorithm=algorithm)
    assert got == pytest.approx({"R1": 100.0, "mAP": 100 * (1 + 2 / 3) / 2, "mINP": 100 * 2 / 3})
    # +0.0 and -0.0 are equal scores, and infinities are ordinary extremes
    assert rank_metrics(torch.tensor([[0.0, -0.0]]), [1], [2, 1], ks=(1,), algorithm=algorithm)["R1"] == 0.0
    assert rank_metrics(torch.tensor([[-0.0, 0.0]]), [1], [1, 2], ks=(1,), algorithm=algorithm)["R1"] == 100.0
    inf = float("inf")
    got = rank_metrics(torch.tensor([[-inf, inf, -1.0, -inf]]), [1], [2, 3, 4, 1], ks=(1,), algorithm=algorithm)
    assert got["mINP"] == pytest.approx(25.0)


def test_default_keys_are_the_protocol():
    similarity, query_pids, gallery_pids = random_case(20, 30, 5, seed=0)
    assert tuple(rank_metrics(similarity, query_pids, gallery_pids)) == KEYS


# ----------------------------------------------------------------------------- against the reference

SHAPES = [(1, 1, 1), (5, 3, 2), (40, 50, 10), (123, 257, 30), (64, 300, 4), (300, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decimals", [None, 1])
def test_random_matrices_match_reference(shape, decimals):
    similarity, query_pids, gallery_pids = random_case(*shape, seed=sum(shape), decimals=decimals)
    want = reference_metrics(similarity, query_pids, gallery_pids)
    for algorithm in ("threshold", "count", "sort"):
        assert_close(rank_metrics(torch.from_numpy(similarity), query_pids, gallery_pids, algorithm=algorithm), want)
    assert_close(rank_metrics(similarity, query_pids, gallery_pids), want)  # numpy float32
    assert_close(rank_metrics(similarity.astype(np.float64), query_pids, gallery_pids), want)  # sort path


def test_auto_uses_both_counting_paths(monkeypatch):
    import tbps.engine.metrics as metrics

    calls = []
    original = metrics._match_ranks_above_worst

    def spy(*args):
        ranks = original(*args)
        calls.append(ranks is not None)
        return ranks

    monkeypatch.setattr(metrics, "_match_ranks_above_worst", spy)
    similarity, query_pids, gallery_pids = random_case(90, 400, 80, seed=9, decimals=2)
    strong = similarity + 6.0 * (query_pids[:, None] == gallery_pids[None, :])  # matches on top
    for scores in (similarity, strong):
        want = reference_metrics(scores, query_pids, gallery_pids)
        assert_close(rank_metrics(scores, query_pids, gallery_pids, chunk_size=30), want)
    assert calls == [False] * 3 + [True] * 3  # random rows fall back to counting; strong ones do not


def test_float16_and_bfloat16_inputs():
    similarity, query_pids, gallery_pids = random_case(80, 120, 12, seed=3)
    half = similarity.astype(np.float16)  # rounding to float16 creates ties
    want = reference_metrics(half, query_pids, gallery_pids)
    assert_close(rank_metrics(half, query_pids, gallery_pids), want)
    assert_close(rank_metrics(torch.from_numpy(half), query_pids, gallery_pids, algorithm="sort"), want)
    bf16 = torch.from_numpy(similarity).bfloat16()
    assert_close(rank_metrics(bf16, query_pids, gallery_pids), reference_metrics(bf16.float(), query_pids, gallery_pids))


def test_integer_scores_and_tensor_pids():
    rng = np.random.default_rng(5)
    similarity = rng.integers(0, 4, (30, 25))  # heavy ties
    gallery_pids = np.arange(25) % 6
    query_pids = rng.integers(0, 6, 30)
    want = reference_metrics(similarity, query_pids, gallery_pids)
    assert_close(rank_metrics(torch.from_numpy(similarity), torch.from_numpy(query_pids),
                              torch.from_numpy(gallery_pids)), want)


def test_chunk_sizes_give_identical_results():
    similarity, query_pids, gallery_pids = random_case(101, 90, 15, seed=11, decimals=1)
    results = [rank_metrics(similarity, query_pids, gallery_pids, chunk_size=c) for c in (1, 7, 101, None)]
    assert all(r == results[0] for r in results)  # bit-identical, not merely close


def test_image_to_text_is_the_transpose():
    similarity, query_pids, gallery_pids = random_case(60, 40, 8, seed=2)
    got = rank_metrics(torch.from_numpy(similarity).T, gallery_pids, query_pids)
    assert_close(got, reference_metrics(similarity.T, gallery_pids, query_pids))


def test_memmap_input(tmp_path):
    similarity, query_pids, gallery_pids = random_case(70, 45, 9, seed=4)
    for dtype in (np.float16, np.float32):
        path = tmp_path / f"scores_{np.dtype(dtype).name}.bin"
        on_disk = np.memmap(path, dtype=dtype, mode="w+", shape=similarity.shape)
        on_disk[:] = similarity
        on_disk.flush()
        reopened = np.memmap(path, dtype=dtype, mode="r", shape=similarity.shape)
        want = reference_metrics(similarity.astype(dtype), query_pids, gallery_pids)
        assert_close(rank_metrics(reopened, query_pids, gallery_pids, chunk_size=16), want)


def test_streaming_form_asks_for_chunks():
    similarity, query_pids, gallery_pids = random_case(50, 35, 7, seed=8)
    asked = []

    def score_fn(start: int, end: int) -> torch.Tensor:
        asked.append((start, end))
        return torch.from_numpy(similarity[start:end])

    got = rank_metrics_from_scores(score_fn, 50, query_pids, gallery_pids, chunk_size=16)
    assert asked == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert got == rank_metrics(similarity, query_pids, gallery_pids)
    assert_close(got, reference_metrics(similarity, query_pids, gallery_pids))


def test_gradients_are_not_needed():
    similarity, query_pids, gallery_pids = random_case(10, 12, 3, seed=1)
    tensor = torch.from_numpy(similarity).requires_grad_()
    assert_close(rank_metrics(tensor, query_pids, gallery_pids), reference_metrics(similarity, query_pids, gallery_pids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    similarity, query_pids, gallery_pids = random_case(200, 150, 20, seed=6, decimals=1)
    want = rank_metrics(similarity, query_pids, gallery_pids)
    for dtype in (torch.float32, torch.float16, torch.float64):
        got = rank_metrics(torch.from_numpy(similarity).to("cuda", dtype), query_pids, gallery_pids, chunk_size=33)
        assert_close(got, rank_metrics(torch.from_numpy(similarity).to(dtype), query_pids, gallery_pids))
    assert_close(rank_metrics(torch.from_numpy(similarity).cuda(), query_pids, gallery_pids), want)


# ----------------------------------------------------------------------------- errors

def test_query_without_match_is_named():
    with pytest.raises(TBPSError, match=r"query 2 \(pid 99\) has no match"):
        rank_metrics(np.zeros((3, 2)), [1, 2, 99], [1, 2])


def test_shape_mismatches():
    with pytest.raises(TBPSError, match="3 x 4"):
        rank_metrics(np.zeros((3, 4)), [1, 2, 3], [1, 2, 3])
    with pytest.raises(TBPSError, match="matrix"):
        rank_metrics(np.zeros(3), [1, 2, 3], [1, 2, 3])
    with pytest.raises(TBPSError, match=r"shape \(2, 3\)"):
        rank_metrics_from_scores(lambda s, e: torch.zeros(e - s, 4), 2, [1, 2], [1, 2, 3])
    with pytest.raises(TBPSError, match="1-D"):
        rank_metrics(np.zeros((2, 2)), [[1, 2]], [1, 2])


def test_nan_and_bad_arguments():
    with pytest.raises(TBPSError, match="row 1 .*NaN"):
        rank_metrics(torch.tensor([[0.1, 0.2], [float("nan"), 0.0]]), [1, 2], [1, 2])
    with pytest.raises(TBPSError, match="ks"):
        rank_metrics(np.eye(2), [1, 2], [1, 2], ks=(0,))
    with pytest.raises(TBPSError, match="chunk_size"):
        rank_metrics(np.eye(2), [1, 2], [1, 2], chunk_size=0)
    with pytest.raises(TBPSError, match="count"):
        rank_metrics(np.eye(2), [1, 2], [1, 2], algorithm="count")  # float64 does not pack
