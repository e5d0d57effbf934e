"""What a downstream task is: the :class:`Task` record each task module fills in, field checks for
its data records, and the two answer parsers (whole words, option letters).

A task module (``fastmemit/downstream/tasks/<name>.py``) defines one module-level ``TASK``; the
registry finds it. Class ids are ``0 .. n_classes-1``; :data:`INVALID` (−1) marks an answer that
could not be parsed (or a log-likelihood tie) and is kept as an extra class in F1 and MCC, as the
research code does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastmemit.errors import FastMemitError

INVALID = -1
FEW_SHOT_POOL = 10  # records 0..9 of every file are the shot pool; tests start at record 10

FieldCheck = Callable[[Any], "str | None"]  # returns a complaint, or None when the value is fine


class DownstreamError(FastMemitError, ValueError):
    """A downstream task, flag or setting is invalid (unknown task, shot count out of range, ...)."""


class DownstreamDataError(DownstreamError):
    """A downstream data file is missing or malformed; the message names file, line and field."""


# ----------------------------------------------------------------------------- field checks


def is_str(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {type(value).__name__} {value!r:.60}"


def is_nonempty_str(value: Any) -> str | None:
    if not isinstance(value, str):
        return is_str(value)
    return None if value.strip() else "expected a non-empty string"


def one_of(*allowed: Any) -> FieldCheck:
    """Exactly one of ``allowed`` (type-strict: ``1`` is not ``"1"`` and ``True`` is not ``1``)."""

    def check(value: Any) -> str | None:
        for a in allowed:
            if type(value) is type(a) and value == a:
                return None
        return f"expected one of {', '.join(repr(a) for a in allowed)}, got {value!r:.60}"

    return check


def str_list(length: int) -> FieldCheck:
    """A list of exactly ``length`` strings."""

    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return f"expected a list of {length} strings, got {type(value).__name__}"
        if len(value) != length:
            return f"expected a list of {length} strings, got {len(value)} items"
        bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
        return f"item {bad[0]} is {type(value[bad[0]]).__name__}, not a string" if bad else None

    return check


# ----------------------------------------------------------------------------- answer parsers

# A "word" is a run of letters/digits, possibly joined by single - _ or ' ("not_entailment",
# "non-entailment", "don't" are one word each), so a label word never matches inside a longer word.
_WORD = re.compile(r"[^\W_]+(?:[-_'][^\W_]+)*")


def word_parser(words: Mapping[str, int]) -> Callable[[str], int]:
    """Parser returning the class of the first whole word of ``text`` found in ``words``.

    Case-insensitive, whole-word: "No." → no, "not" / "none" / "know" → nothing, "positively" →
    nothing, "not_entailment" → not_entailment (never entailment). Nothing found → INVALID.
    """
    table = {w.lower(): c for w, c in words.items()}
    for w in table:
        if _WORD.fullmatch(w) is None:
            raise ValueError(f"answer word {w!r} is not a single word")

    def parse(text: str) -> int:
        for w in _WORD.findall(text):
            c = table.get(w.lower())
            if c is not None:
                return c
        return INVALID

    return parse


def letter_parser(letters: str = "ABCD") -> Callable[[str], int]:
    """Parser for an option letter at the start of the continuation (after optional whitespace).

    Accepted: "B", " (B)", "B)", "B.", "B\\n...", "B is ...", and lower case only when the letter
    stands alone ("b", "b\\n", "(b)", "b." — so the article in " a good idea" is not option A).
    Anything else (another letter, a word, an empty continuation) → INVALID.
    """
    up = re.escape(letters.upper())
    low = re.escape(letters.lower())
    upper_re = re.compile(rf"\s*\(?([{up}])(?![\w'])")
    lower_re = re.compile(rf"\s*\(?([{low}])(?:\)|[.:;,]|[ \t]*(?:\n|$))")

    def parse(text: str) -> int:
        m = upper_re.match(text) or lower_re.match(text)
        return letters.upper().index(m.group(1).upper()) if m else INVALID

    return parse


# ----------------------------------------------------------------------------- the task record


@dataclass(frozen=True)
class Task:
    """One few-shot classification task.

    ``shot(record)`` renders a solved example (ending in a newline), ``test(record)`` the question
    whose answer the model must produce; the prompt is ``shots[0] + ... + shots[k-1] + test``.
    Log-likelihood scoring ranks ``test(record) + " " + verbalizers[c]`` over classes ``c``;
    generation scoring decodes ``gen_len`` tokens and applies ``parse``.
    """

    name: str
    filename: str = field(metadata={"help": "file name inside the data folder, e.g. 'sst2.jsonl'"})
    labels: tuple[str, ...] = field(metadata={"help": "class names by class id"})
    verbalizers: tuple[str, ...] = field(metadata={"help": "answer word per class id, scored after a space"})
    fields: Mapping[str, FieldCheck] = field(metadata={"help": "required record fields and their checks"})
    label_of: Callable[[dict], int] = field(metadata={"help": "record -> class id"})
    shot: Callable[[dict], str] = field(metadata={"help": "record -> solved example text"})
    test: Callable[[dict], str] = field(metadata={"help": "record -> question text (no answer)"})
    parse: Callable[[str], int] = field(metadata={"help": "generated continuation -> class id or INVALID"})
    aliases: tuple[str, ...] = ()
    gen_len: int = field(default=3, metadata={"help": "tokens to generate; the research code always uses 3"})
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"task name {self.name!r} must be lower-case letters, digits and '_'")
        if len(self.labels) < 2 or len(self.labels) != len(self.verbalizers):
            raise ValueError(f"task {self.name}: need ≥ 2 labels and one verbalizer per label")
        if len(set(self.verbalizers)) != len(self.verbalizers):
            raise ValueError(f"task {self.name}: verbalizers must be distinct")
        if self.gen_len < 1:
            raise ValueError(f"task {self.name}: gen_len must be ≥ 1")

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    @property
    def options(self) -> tuple[str, ...]:
        """The continuations ranked by log-likelihood: a space, then the verbalizer."""
        return tuple(" " + v for v in self.verbalizers)
