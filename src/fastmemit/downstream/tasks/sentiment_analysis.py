"""``sentiment_analysis``: the full SST-2 validation set in an instruction template: positive/negative.

Prompt wording is the research code's (``glue_eval/sentiment_analysis_eval.py``), missing spaces
included. Labels are the strings "0" (negative) / "1" (positive) in the file. The sentences are a
superset of ``sst2``'s, so the two tasks are not independent.
"""

from fastmemit.downstream.base import Task, is_str, one_of, word_parser

PREFIX = (
    "For each snippet of text,label the sentiment of the text as positive or negative."
    "The answer should be exact 'positive' or 'negative'. text:"
)
POSTFIX = "answer:"
VERBALIZERS = ("negative", "positive")


def _label(r: dict) -> int:
    return int(r["label"])


def _test(r: dict) -> str:
    return f"{PREFIX} {r['sentence']} {POSTFIX}"


def _shot(r: dict) -> str:
    return f"{_test(r)} {VERBALIZERS[_label(r)]}\n"


TASK = Task(
    name="sentiment_analysis",
    filename="sentiment_analysis.jsonl",
    labels=("negative", "positive"),
    verbalizers=VERBALIZERS,
    fields={"sentence": is_str, "label": one_of("0", "1")},
    label_of=_label,
    shot=_shot,
    test=_test,
    parse=word_parser({"negative": 0, "positive": 1}),
    description="SST-2 sentiment, instruction-style template (positive/negative)",
)
