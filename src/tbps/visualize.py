"""``tbps visualize``: ranked lists as a PNG grid, one row per text query.

Each row shows the query text and its top-k gallery images with rank and score. Where the
identities are known (queries drawn from a dataset split, or a typed query that is one of the
split's captions) a true match is framed green and marked ✓, anyone else red and ✗; where they are
not (an index of your own images) frames are grey. This is torchreid's ``visrank`` and fast-reid's
ranked-list visualisation, turned around for text queries.

Two sources of rankings:

- a dataset split (:func:`rank_dataset_queries`): the evaluator's gallery, embedded and scored
  through the model's own hooks (``embed_images``, ``embed_texts``, ``similarity``), so the picture
  ranks exactly as ``tbps eval`` does; queries are captions of the split drawn with a seed, or texts
  given on the command line;
- a persistent index (:func:`rank_index_queries`): ``tbps.search.Searcher``, as ``tbps search``.

Rendering uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from tbps.errors import TBPSError
from tbps.extras import available, missing_extra, require

MATCH_COLOUR = "#1a9641"     # green: the described person
OTHER_COLOUR = "#d7191c"     # red: someone else
UNKNOWN_COLOUR = "#8c8c8c"   # grey: identity not known
MAX_TOP_K = 20
MAX_QUERIES = 20


@dataclass
class Hit:
    """One ranked gallery image; ``match`` is None when identities are unknown."""

    rank: int
    path: str
    score: float
    match: bool | None = None


@dataclass
class RankedQuery:
    """A query text and its ranked hits; ``first_match_rank`` is the rank of the best-ranked true
    match over the whole gallery (None when identities are unknown)."""

    text: str
    hits: list[Hit] = field(default_factory=list)
    first_match_rank: int | None = None
    gallery: str = ""   # what was ranked, for the picture's title


# ----------------------------------------------------------------------------- rankings

def _check_counts(top_k: int, num_queries: int | None = None) -> None:
    if not 1 <= top_k <= MAX_TOP_K:
        raise TBPSError(f"top-k must be between 1 and {MAX_TOP_K}, got {top_k}")
    if num_queries is not None and not 1 <= num_queries <= MAX_QUERIES:
        raise TBPSError(f"the number of queries must be between 1 and {MAX_QUERIES}, got {num_queries}")


def _clean_queries(queries: Sequence[str]) -> list[str]:
    cleaned = [" ".join(q.split()) for q in queries]
    if any(not q for q in cleaned):
        raise TBPSError("a query is empty")
    if len(cleaned) > MAX_QUERIES:
        raise TBPSError(f"at most {MAX_QUERIES} queries fit in one picture, got {len(cleaned)}")
    return cleaned


def rank_dataset_queries(checkpoint: str | os.PathLike, dataset: str | None = None,
                         root: str | os.PathLike | None = None, split: str = "test",
                         queries: Sequence[str] | None = None, num_queries: int = 4, top_k: int = 5,
                         seed: int = 0, device: str = "auto", batch_size: int = 128,
                         progress: bool = True) -> list[RankedQuery]:
    """Rank a dataset split's gallery for ``queries``, or for ``num_queries`` of its captions drawn
    with ``seed``. The dataset defaults to the checkpoint's own (as ``tbps eval``)."""
    from tbps.engine.evaluator import checkpoint_evaluator

    _check_counts(top_k, None if queries else num_queries)
    texts = _clean_queries(queries) if queries else None
    evaluator, name, _ = checkpoint_evaluator(checkpoint, dataset, root, split, device, batch_size,
                                           progress=progress, num_workers=0)
    model = evaluator.model

    if texts is None:
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randperm(len(evaluator.captions), generator=generator)[:num_queries].tolist()
        texts = [evaluator.captions[i] for i in picks]
        pids: list[int | None] = [evaluator.query_pids[i] for i in picks]
    else:
        # a typed query that is one of the split's captions has a known person
        caption_pid = {" ".join(c.split()): p for c, p in zip(evaluator.captions, evaluator.query_pids)}
        pids = [caption_pid.get(text) for text in texts]

    gallery_pids = torch.tensor(evaluator.gallery_pids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            image_feats = evaluator.embed_gallery()
            text_feats = evaluator.embedder.embed_texts(texts)
            scores = evaluator.similarity(text_feats, image_feats).float().cpu()
    finally:
        model.train(was_training)

    k = min(top_k, len(evaluator.image_paths))
    gallery = f"{name} {split} split ({len(evaluator.image_paths):,} images of {len(set(evaluator.gallery_pids)):,} people)"
    ranked = []
    for row, text, pid in zip(scores, texts, pids):
        top = torch.topk(row, k)
        hits = [Hit(rank=r, path=evaluator.image_paths[g], score=float(s),
                     match=None if pid is None else bool(gallery_pids[g] == pid))
                for r, (s, g) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1)]
        first = None
        if pid is not None and bool((gallery_pids == pid).any()):
            best_match = row[gallery_pids == pid].max()
            first = int((row > best_match).sum()) + 1
        ranked.append(RankedQuery(text=text, hits=hits, first_match_rank=first, gallery=gallery))
    return ranked


def rank_index_queries(index_dir: str | os.PathLike, queries: Sequence[str], top_k: int = 5,
                       checkpoint: str | os.PathLike | None = None, rerank: bool = True,
                       device: str = "auto", image_root: str | os.PathLike | None = None) -> list[RankedQuery]:
    """Rank a persistent index (``tbps index``) for ``queries``; identities are unknown there."""
    from tbps.search import Searcher

    _check_counts(top_k)
    texts = _clean_queries(queries)
    if not texts:
        raise TBPSError("give at least one query to search the index for")
    searcher = Searcher(index_dir, checkpoint=checkpoint, device=device, image_root=image_root)
    results = searcher.search(texts, top_k=top_k, rerank=rerank)
    gallery = f"index {index_dir} ({searcher.size:,} images)"
    return [RankedQuery(text=text, hits=[Hit(rank=int(r["rank"]), path=str(r["path"]), score=float(r["score"]))
                                         for r in rows], gallery=gallery)
            for text, rows in zip(texts, results)]


# ----------------------------------------------------------------------------- rendering

def _frame_colour(match: bool | None) -> str:
    return UNKNOWN_COLOUR if match is None else MATCH_COLOUR if match else OTHER_COLOUR


def _load_thumbnail(path: str):
    from PIL import Image

    from tbps.data.images import load_image

    image = load_image(path)
    image.thumbnail((256, 512), Image.Resampling.BICUBIC)  # bounds memory for large gallery images
    return image


def render_grid(ranked: Sequence[RankedQuery], out: str | os.PathLike, title: str | None = None,
                dpi: int = 100) -> Path:
    """Write the PNG grid (one row per query: text panel, then the ranked images) to ``out``."""
    matplotlib = require("matplotlib", "plots", "tbps visualize")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from tbps.io import atomic_path

    if not ranked:
        raise TBPSError("nothing to draw: no queries")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise TBPSError(f"{out}: the picture is written as PNG, give a file name ending in .png")
    columns = max(1, max(len(q.hits) for q in ranked))
    cell_w, cell_h, text_w = 1.25, 2.55, 2.6
    known = any(h.match is not None for q in ranked for h in q.hits)
    header = 0.55 if (title or known) else 0.0
    footer = 0.2  # room for the last row's file names
    fig_w, fig_h = text_w + columns * cell_w, header + len(ranked) * cell_h + footer
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    grid = fig.add_gridspec(len(ranked), columns + 1, width_ratios=[text_w] + [cell_w] * columns,
                            left=0.01, right=0.99, bottom=footer / fig_h, top=1 - header / fig_h,
                            wspace=0.08, hspace=0.25)
    for row, query in enumerate(ranked):
        text_ax = fig.add_subplot(grid[row, 0])
        text_ax.axis("off")
        lines = textwrap.fill(query.text, width=38)
        note = ""
        if query.first_match_rank is not None:
            note = f"\n\nfirst true match: rank {query.first_match_rank}"
        text_ax.text(0.0, 0.95, f"query {row + 1}", fontsize=10, fontweight="bold", va="top",
                     transform=text_ax.transAxes)
        text_ax.text(0.0, 0.84, lines + note, fontsize=8.5, va="top", transform=text_ax.transAxes,
                     linespacing=1.3)
        for col, hit in enumerate(query.hits):
            ax = fig.add_subplot(grid[row, col + 1])
            ax.imshow(_load_thumbnail(hit.path))
            ax.set_xticks([])
            ax.set_yticks([])
            colour = _frame_colour(hit.match)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            mark = "" if hit.match is None else (" ✓" if hit.match else " ✗")
            ax.set_title(f"#{hit.rank}  {hit.score:.3f}{mark}", fontsize=8.5, color=colour if mark else "black",
                         pad=4)
            ax.set_xlabel(textwrap.shorten(Path(hit.path).name, width=22, placeholder="…"), fontsize=6.5,
                          labelpad=2)
    if title:
        fig.suptitle(title, x=0.01, y=1 - 0.08 / fig_h, ha="left", va="top", fontsize=11)
    if known:
        fig.legend(handles=[Patch(facecolor="none", edgecolor=MATCH_COLOUR, linewidth=3, label="the described person ✓"),
                            Patch(facecolor="none", edgecolor=OTHER_COLOUR, linewidth=3, label="someone else ✗")],
                   loc="upper right", bbox_to_anchor=(0.99, 1.0), ncol=2, fontsize=8.5, frameon=False)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return out


def visualize(out: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
              index: str | os.PathLike | None = None, dataset: str | None = None,
              root: str | os.PathLike | None = None, split: str = "test", queries: Sequence[str] = (),
              num_queries: int = 4, top_k: int = 5, seed: int = 0, rerank: bool = True,
              device: str = "auto", progress: bool = True,
              image_root: str | os.PathLike | None = None) -> list[RankedQuery]:
    """Rank (from an index if ``index`` is given, else from a dataset split) and draw to ``out``."""
    if not available("matplotlib"):  # before any model is loaded
        raise missing_extra("plots", "tbps visualize")
    if index is not None:
        if dataset is not None or root is not None:
            raise TBPSError("give either --index or --dataset/--root, not both")
        if not queries:
            raise TBPSError("searching an index needs the queries on the command line")
        ranked = rank_index_queries(index, queries, top_k=top_k, checkpoint=checkpoint, rerank=rerank,
                                    device=device, image_root=image_root)
        title = f"{ranked[0].gallery}: top {top_k} (identities unknown: grey frames)"
    else:
        if image_root is not None:
            raise TBPSError("--image-root goes with --index (a dataset's images are under --root)")
        if checkpoint is None:
            raise TBPSError("give --checkpoint (with --dataset/--root, or the checkpoint's own dataset), or --index")
        ranked = rank_dataset_queries(checkpoint, dataset=dataset, root=root, split=split, queries=queries or None,
                                      num_queries=num_queries, top_k=top_k, seed=seed, device=device,
                                      progress=progress)
        title = f"{ranked[0].gallery}: top {top_k}"
    render_grid(ranked, out, title=title)
    return ranked
