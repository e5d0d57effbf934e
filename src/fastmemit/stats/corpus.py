"""Text corpora for covariance statistics.

A corpus yields documents (strings) in a fixed order and has an ``identity`` string that changes
whenever its content changes; the statistics cache is keyed by it. Sources:

- a file: ``.jsonl`` (one JSON object per line with a ``text`` field, or one string per line),
  ``.json`` (a list of strings or of objects with ``text``), ``.txt`` (one document per non-empty
  line);
- a folder: every ``*.txt``/``*.md`` file under it is one document, in sorted path order;
- ``gensim-wiki`` (the offline default): the Wikipedia articles dump shipped inside the ``gensim``
  wheel, markup stripped;
- ``hf:wikimedia/wikipedia[:config]``: Hugging Face ``datasets`` streaming, for users who are online.

``shuffled(corpus, seed)`` gives a seeded, deterministic buffer-shuffled order.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fastmemit.errors import CorpusError

DEFAULT_CORPUS = "gensim-wiki"
_TEXT_SUFFIXES = (".txt", ".md")


class Corpus(Protocol):
    identity: str

    def __iter__(self) -> Iterator[str]: ...


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class FileCorpus:
    path: Path
    text_field: str = "text"

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.is_file():
            raise CorpusError(f"corpus file {str(self.path)!r} does not exist")
        if self.path.suffix not in (".jsonl", ".json", ".txt"):
            raise CorpusError(f"corpus file {str(self.path)!r}: unsupported suffix {self.path.suffix!r} (use .jsonl, .json or .txt)")
        self.identity = f"file:{self.path.name}:{_hash_file(self.path)}"

    def _from_obj(self, obj: object, where: str) -> str:
        if isinstance(obj, str):
            return obj
        if isinstance(obj, dict) and isinstance(obj.get(self.text_field), str):
            return obj[self.text_field]
        raise CorpusError(f"corpus {str(self.path)!r}, {where}: expected a string or an object with a string {self.text_field!r} field")

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._documents()
        except UnicodeDecodeError as e:
            raise CorpusError(f"corpus {str(self.path)!r}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None

    def _documents(self) -> Iterator[str]:
        if self.path.suffix == ".jsonl":
            with open(self.path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise CorpusError(f"corpus {str(self.path)!r}, line {i}: invalid JSON ({e.msg})") from e
                    yield self._from_obj(obj, f"line {i}")
        elif self.path.suffix == ".json":
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CorpusError(f"corpus {str(self.path)!r}: invalid JSON ({e.msg} at line {e.lineno})") from e
            if not isinstance(data, list):
                raise CorpusError(f"corpus {str(self.path)!r}: expected a JSON list of documents")
            for i, obj in enumerate(data):
                yield self._from_obj(obj, f"record {i}")
        else:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")


@dataclass
class FolderCorpus:
    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.is_dir():
            raise CorpusError(f"corpus folder {str(self.path)!r} does not exist")
        self.files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)
        h = hashlib.sha256()
        for p in self.files:
            h.update(str(p.relative_to(self.path)).encode())
            h.update(_hash_file(p).encode())
        self.identity = f"folder:{self.path.name}:{h.hexdigest()[:16]}"

    def __iter__(self) -> Iterator[str]:
        for p in self.files:
            yield p.read_text(encoding="utf-8", errors="replace")


def gensim_wiki_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the offline default corpus needs the 'gensim' package: pip install gensim==4.4.0")
    p = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    p = p / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    if not p.is_file():
        raise CorpusError(f"gensim's Wikipedia sample not found at {p}")
    return p


_WS = re.compile(r"[ \t]+")
_QUOTES = re.compile(r"'{2,}")


@dataclass
class GensimWikiCorpus:
    """Main-namespace articles of the Wikipedia dump inside the gensim wheel (about 100 articles)."""

    min_chars: int = 200

    def __post_init__(self) -> None:
        self.path = gensim_wiki_path()
        self.identity = f"gensim-wiki:{_hash_file(self.path)}"

    def __iter__(self) -> Iterator[str]:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki

        with bz2.open(self.path) as f:
            for _title, raw, _pid in extract_pages(f, filter_namespaces=("0",)):
                if raw.lstrip().upper().startswith("#REDIRECT"):
                    continue
                text = _QUOTES.sub("", filter_wiki(raw))
                lines = (_WS.sub(" ", line).strip() for line in text.splitlines())
                text = "\n".join(line for line in lines if line)
                if len(text) >= self.min_chars:
                    yield text


@dataclass
class HFStreamingCorpus:
    """A Hugging Face dataset streamed with ``datasets`` (online users), e.g. wikimedia/wikipedia."""

    name: str = "wikimedia/wikipedia"
    config: str | None = "20231101.en"
    split: str = "train"
    text_field: str = "text"

    def __post_init__(self) -> None:
        self.identity = f"hf:{self.name}:{self.config}:{self.split}"

    def __iter__(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError as e:
            raise CorpusError("streaming a hub corpus needs 'datasets': pip install fastmemit[online]") from e
        ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        for row in ds:
            yield row[self.text_field]


def corpus_from_spec(spec: str | os.PathLike[str] | Corpus | None) -> Corpus:
    """Build a corpus from a path, ``gensim-wiki``, ``hf:NAME[:CONFIG]``, or pass a corpus through."""
    if spec is None:
        spec = DEFAULT_CORPUS
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    s = str(spec)
    if s == "gensim-wiki":
        return GensimWikiCorpus()
    if s.startswith("hf:"):
        parts = s[3:].split(":")
        return HFStreamingCorpus(name=parts[0], config=parts[1] if len(parts) > 1 else None)
    p = Path(s).expanduser()
    if p.is_dir():
        return FolderCorpus(p)
    if p.is_file():
        return FileCorpus(p)
    raise CorpusError(f"corpus {s!r} not found: give a .jsonl/.json/.txt file, a folder, 'gensim-wiki' or 'hf:NAME[:CONFIG]'")


def shuffled(docs: Iterator[str], seed: int | None, buffer: int = 1000) -> Iterator[str]:
    """Deterministic buffer shuffle (streams of any length); ``seed=None`` keeps the corpus order."""
    if seed is None:
        yield from docs
        return
    rng = random.Random(seed)
    buf: list[str] = []
    for d in docs:
        buf.append(d)
        if len(buf) >= buffer:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf
