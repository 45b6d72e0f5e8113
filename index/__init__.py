"""Collections: FAISS vectors + SQLite metadata + ingest. Works on arrays + an Embedder; never imports mm."""

from index.collection import Collection
from index.ingest import add_text, ingest, ingest_one
from index.types import Filter, Hit, IngestReport, Item, ItemError
from index.vectors import IndexPolicy, build_index, choose_spec

__all__ = [
    "Collection",
    "Filter",
    "Hit",
    "IndexPolicy",
    "IngestReport",
    "Item",
    "ItemError",
    "add_text",
    "build_index",
    "choose_spec",
    "ingest",
    "ingest_one",
]
