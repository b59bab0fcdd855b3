"""Search with a trained model: an index over a split's images or captions, and two-stage queries (README, Search).

`build_index` encodes a gallery once (resumable, memory-mapped float16 embeddings, a FAISS index over each item's
global vector); `Index.query` picks candidates by the global vector and re-ranks them with the method's exact score.
The `zoo-search` command (zoo.search.cli) wraps both.
"""
from .index import Hit, Index, IndexWriter, Results, ShardedIndex, build_index, sha256_file

__all__ = ["Hit", "Index", "IndexWriter", "Results", "ShardedIndex", "build_index", "sha256_file"]
