"""SST-2 sentiment (GLUE validation, balanced): ``Review : <sentence>\\nSentiment : positive``.

Prompt wording is the research code's (``glue_eval/sst_eval.py``), including its quirk that the
test question has no space after ``Review :`` while the shots do. Labels: 0 negative, 1 positive.
Alias: ``sst``.
"""

from fastmemit.downstream.base import Task, is_str, one_of, word_parser

PREFIX = "Review :"
POSTFIX = "\nSentiment :"
VERBALIZERS = ("negative", "positive")


def _shot(r: dict) -> str:
    return f"{PREFIX} {r['sentence']}{POSTFIX} {VERBALIZERS[r['label']]}\n"


def _test(r: dict) -> str:
    return PREFIX + r["sentence"] + POSTFIX


TASK = Task(
    name="sst2",
    aliases=("sst",),
    filename="sst2.jsonl",
    labels=("negative", "positive"),
    verbalizers=VERBALIZERS,
    fields={"sentence": is_str, "label": one_of(0, 1)},
    label_of=lambda r: r["label"],
    shot=_shot,
    test=_test,
    parse=word_parser({"negative": 0, "positive": 1}),
    description="SST-2 movie-review sentiment (positive/negative)",
)
