"""RTE textual entailment (GLUE validation, balanced): ``<premise>\\nquestion: <hypothesis> True or False?``.

Prompt wording is the research code's (``glue_eval/rte_eval.py``), **but its label direction is
fixed**. The data follows GLUE: 0 = entailment, 1 = not_entailment. The research code wrote
``'False' if label == 0 else 'True'`` in its shots and scored "True" as correct for label 1, i.e.
it taught and rewarded "True" when the hypothesis is *not* entailed. Here entailment is "True"
and not_entailment is "False" (in the shots, the parser and the ranked options alike), so RTE
numbers are not comparable with published ones that used the inverted labels. The data file's
``reference_target`` field records the old, inverted target and is ignored.
"""

from fastmemit.downstream.base import Task, is_str, one_of, word_parser

VERBALIZERS = ("True", "False")  # class 0 entailment -> True, class 1 not_entailment -> False


def _test(r: dict) -> str:
    return r["sentence1"] + "\n" + "question: " + r["sentence2"] + " True or False?" + "\n" + "answer:"


def _shot(r: dict) -> str:
    return f"{_test(r)} {VERBALIZERS[r['label']]}\n"


TASK = Task(
    name="rte",
    filename="rte.jsonl",
    labels=("entailment", "not_entailment"),
    verbalizers=VERBALIZERS,
    fields={"sentence1": is_str, "sentence2": is_str, "label": one_of(0, 1)},
    label_of=lambda r: r["label"],
    shot=_shot,
    test=_test,
    parse=word_parser({"true": 0, "false": 1, "entailment": 0, "not_entailment": 1}),
    description="RTE entailment (True/False; the research code's inverted label fixed)",
)
