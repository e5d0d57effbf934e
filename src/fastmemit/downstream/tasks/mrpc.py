"""MRPC paraphrase detection (GLUE validation, balanced): answer ``Yes``/``No``.

Prompt wording is the research code's (``glue_eval/mrpc_eval.py``). Labels: 0 not_equivalent
("No"), 1 equivalent ("Yes"). Unlike the research code's substring test (where "not", "know",
"none" counted as "no"), the parser matches whole words only.
"""

from fastmemit.downstream.base import Task, is_str, one_of, word_parser

PREFIX = "Are the sentences paraphrases of each other.\n"
VERBALIZERS = ("No", "Yes")


def _body(r: dict) -> str:
    return f"{PREFIX}Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\nAnswer:"


def _shot(r: dict) -> str:
    return f"{_body(r)} {VERBALIZERS[r['label']]}\n"


TASK = Task(
    name="mrpc",
    filename="mrpc.jsonl",
    labels=("not_equivalent", "equivalent"),
    verbalizers=VERBALIZERS,
    fields={"sentence1": is_str, "sentence2": is_str, "label": one_of(0, 1)},
    label_of=lambda r: r["label"],
    shot=_shot,
    test=_body,
    parse=word_parser({"no": 0, "yes": 1, "not_equivalent": 0, "equivalent": 1}),
    description="MRPC sentence-pair paraphrase (Yes/No)",
)
