"""``dialogue``: MuTual dev, pick the next dialogue turn among four: answer a letter A–D.

Prompt wording is the research code's (``glue_eval/dialogue_eval.py``; no space after ``(A)``).
The research code stops adding shots once fewer than 5 tokens would remain; here every task
reserves room for the generated tokens and the longest option, which covers that case too.
"""

from fastmemit.downstream.base import Task, is_str, letter_parser, one_of, str_list

LETTERS = ("A", "B", "C", "D")


def _test(r: dict) -> str:
    o = r["options"]
    return (
        f"Q: Given the following: {r['article']}\nWhich choice is correct?\n"
        f"(A){o[0]}\n(B){o[1]}\n(C){o[2]}\n(D){o[3]}\nAnswer:"
    )


def _shot(r: dict) -> str:
    return f"{_test(r)} {r['answers']}\n\n"


TASK = Task(
    name="dialogue",
    filename="dialogue.jsonl",
    labels=LETTERS,
    verbalizers=LETTERS,
    fields={"article": is_str, "options": str_list(4), "answers": one_of(*LETTERS)},
    label_of=lambda r: LETTERS.index(r["answers"]),
    shot=_shot,
    test=_test,
    parse=letter_parser("ABCD"),
    description="MuTual next-turn selection (letter A-D)",
)
