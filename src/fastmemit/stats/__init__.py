"""Covariance statistics of preserved keys: corpora, the one-pass engine, the disk cache."""

from fastmemit.stats.corpus import (
    DEFAULT_CORPUS,
    Corpus,
    FileCorpus,
    FolderCorpus,
    GensimWikiCorpus,
    HFStreamingCorpus,
    corpus_from_spec,
)
from fastmemit.stats.engine import LayerStats, compute_layer_stats, resolve_count

__all__ = [
    "DEFAULT_CORPUS",
    "Corpus",
    "FileCorpus",
    "FolderCorpus",
    "GensimWikiCorpus",
    "HFStreamingCorpus",
    "LayerStats",
    "compute_layer_stats",
    "corpus_from_spec",
    "resolve_count",
]
