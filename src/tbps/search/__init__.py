"""Search your own gallery: a persistent index of image embeddings, and text queries against it.

- ``tbps.search.index``: ``build_index`` embeds a folder or list of images into an index folder
  (resumable shards, memory-mapped features, the model's fingerprint) and ``GalleryIndex`` reads it;
- ``tbps.search.ann``: the first stage, exact (chunked matrix product) or FAISS (HNSW / IVF);
- ``tbps.search.rerank``: the second stage, the method's own similarity on the shortlist;
- ``tbps.search.searcher``: ``Searcher`` ties the model, the index and both stages together.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_index", "Searcher", "GalleryIndex"]


def __getattr__(name: str) -> Any:
    # lazy, so `import tbps.search` stays cheap for the CLI and the server
    if name in ("build_index", "GalleryIndex"):
        from tbps.search import index

        return getattr(index, name)
    if name == "Searcher":
        from tbps.search.searcher import Searcher

        return Searcher
    raise AttributeError(f"module 'tbps.search' has no attribute {name!r}")
