"""``nli``: textual entailment on GLUE RTE *train* (not MNLI, despite the name): True/False.

Prompt wording is the research code's (``glue_eval/nli_eval.py``), including its odd
``<premise> entails the <hypothesis> True or False? Answer:``. Its label direction is already
right (entailment = True). Labels are strings in the file; class 0 entailment, 1 not_entailment
(the same order as ``rte``).
"""

from fastmemit.downstream.base import Task, is_str, one_of, word_parser

POSTFIX = "True or False? Answer:"
LABELS = ("entailment", "not_entailment")
VERBALIZERS = ("True", "False")


def _label(r: dict) -> int:
    return LABELS.index(r["label"])


def _test(r: dict) -> str:
    return f"{r['sentence1']} entails the {r['sentence2']} {POSTFIX}"


def _shot(r: dict) -> str:
    return f"{_test(r)} {VERBALIZERS[_label(r)]}\n"


TASK = Task(
    name="nli",
    filename="nli.jsonl",
    labels=LABELS,
    verbalizers=VERBALIZERS,
    fields={"sentence1": is_str, "sentence2": is_str, "label": one_of(*LABELS)},
    label_of=_label,
    shot=_shot,
    test=_test,
    parse=word_parser({"true": 0, "false": 1, "entailment": 0, "not_entailment": 1}),
    description="RTE-train entailment in the 'entails the' template (True/False)",
)
