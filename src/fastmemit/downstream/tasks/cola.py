"""CoLA linguistic acceptability (GLUE validation, balanced): answer ``Yes``/``No``.

Prompt wording is the research code's (``glue_eval/cola_eval.py``), including the trailing space
of its test question (``...Answer: ``), so the ranked continuation reads ``Answer:  Yes`` with two
spaces exactly as there. Labels: 0 unacceptable ("No"), 1 acceptable ("Yes"). MCC is the usual
headline metric for CoLA.
"""

from fastmemit.downstream.base import Task, is_str, one_of, word_parser

PREFIX = "Is this sentence linguistically acceptable?\n"
VERBALIZERS = ("No", "Yes")


def _shot(r: dict) -> str:
    return f"{PREFIX}Sentence: {r['sentence']}\nAnswer: {VERBALIZERS[r['label']]}\n"


def _test(r: dict) -> str:
    return PREFIX + "Sentence: " + r["sentence"] + "\n" + "Answer: "


TASK = Task(
    name="cola",
    filename="cola.jsonl",
    labels=("unacceptable", "acceptable"),
    verbalizers=VERBALIZERS,
    fields={"sentence": is_str, "label": one_of(0, 1)},
    label_of=lambda r: r["label"],
    shot=_shot,
    test=_test,
    parse=word_parser({"no": 0, "yes": 1, "unacceptable": 0, "acceptable": 1}),
    description="CoLA grammatical acceptability (Yes/No)",
)
