"""MMLU multiple choice (validation split, 57 subjects, balanced answers): answer a letter A–D.

Prompt wording is the research code's (``glue_eval/mmlu_eval.py``): no subject header, shots
from mixed subjects. The research code's parser needed ``a\\n`` inside 3 generated tokens (and
matched any word ending in a/b/c/d); here the letter must open the continuation (see
:func:`~fastmemit.downstream.base.letter_parser`).
"""

from fastmemit.downstream.base import Task, is_str, letter_parser, one_of, str_list

LETTERS = ("A", "B", "C", "D")


def _test(r: dict) -> str:
    c = r["choices"]
    return f"Question: {r['question']}\n(A) {c[0]}\n(B) {c[1]}\n(C) {c[2]}\n(D) {c[3]}\nAnswer:"


def _shot(r: dict) -> str:
    return f"{_test(r)} {LETTERS[r['answer']]}\n"


TASK = Task(
    name="mmlu",
    filename="mmlu.jsonl",
    labels=LETTERS,
    verbalizers=LETTERS,
    fields={"question": is_str, "choices": str_list(4), "answer": one_of(0, 1, 2, 3)},
    label_of=lambda r: r["answer"],
    shot=_shot,
    test=_test,
    parse=letter_parser("ABCD"),
    description="MMLU 4-way multiple choice (letter A-D)",
)
