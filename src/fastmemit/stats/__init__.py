"""Covariance statistics of preserved keys: corpora, the one-pass engine, the disk cache, and the
provider that hands an edit its statistics and Cholesky factors."""

from fastmemit.stats.corpus import (
    DEFAULT_CORPUS,
    Corpus,
    FileCorpus,
    FolderCorpus,
    GensimWikiCorpus,
    HFStreamingCorpus,
    corpus_from_spec,
)
from fastmemit.stats.engine import ALL_KEYS, LayerStats, compute_layer_stats, resolve_count
from fastmemit.stats.provider import LayerPreserved, PreservedMatrix, PreservedStats

__all__ = [
    "ALL_KEYS",
    "DEFAULT_CORPUS",
    "Corpus",
    "FileCorpus",
    "FolderCorpus",
    "GensimWikiCorpus",
    "HFStreamingCorpus",
    "LayerPreserved",
    "LayerStats",
    "PreservedMatrix",
    "PreservedStats",
    "compute_layer_stats",
    "corpus_from_spec",
    "resolve_count",
]
