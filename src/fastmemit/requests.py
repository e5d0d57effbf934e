"""Edit requests: what fact to write into the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fastmemit.errors import EditError


@dataclass(frozen=True)
class EditRequest:
    """Rewrite "prompt → target_true" into "prompt → target_new" for ``subject``.

    ``prompt`` either contains ``{}`` where the subject goes (``"The mother tongue of {} is"``) or
    contains the subject literally (``"The mother tongue of Danielle Darrieux is"``).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise EditError(f"edit request field {name!r} must be a string, got {type(v).__name__}")
        if not self.subject.strip():
            raise EditError(f"edit request {self._label()}: empty subject")
        if not self.target_new.strip():
            raise EditError(f"edit request {self._label()}: empty target_new")
        if self.case_id is not None and (isinstance(self.case_id, bool) or not isinstance(self.case_id, (int, str))):
            raise EditError(f"edit request case_id must be an integer or a string, got {self.case_id!r:.60}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise EditError(f"edit request {self._label()}: target_true must be a string or null")
        if self.prompt.count("{}") > 1:
            raise EditError(f"edit request {self._label()}: prompt has more than one '{{}}'")
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise EditError(
                f"edit request {self._label()}: subject {self.subject!r} not found in prompt {self.prompt!r} "
                "(put '{}' where the subject goes or include the subject literally)"
            )

    def _label(self) -> str:
        return repr(self.case_id) if self.case_id is not None else repr(self.prompt[:60])

    @property
    def template(self) -> str:
        """The prompt with ``{}`` at the (first) occurrence of the subject."""
        if "{}" in self.prompt:
            return self.prompt
        i = self.prompt.index(self.subject)
        return self.prompt[:i] + "{}" + self.prompt[i + len(self.subject) :]

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_any(cls, obj: EditRequest | Mapping[str, Any]) -> EditRequest:
        """Accept an EditRequest, our dict form, or the research code's ``requested_rewrite`` form."""
        if isinstance(obj, EditRequest):
            return obj
        if not isinstance(obj, Mapping):
            raise EditError(f"edit request must be a mapping or EditRequest, got {type(obj).__name__}")
        d = dict(obj)
        if "requested_rewrite" in d:
            cid = d.get("case_id")
            if not isinstance(d["requested_rewrite"], Mapping):
                raise EditError(f"edit request field 'requested_rewrite' must be an object, got "
                                f"{type(d['requested_rewrite']).__name__}")
            d = dict(d["requested_rewrite"])
            d.setdefault("case_id", cid)
        for k in ("target_new", "target_true"):
            if isinstance(d.get(k), Mapping):
                d[k] = d[k].get("str")
        if "ground_truth" in d and "target_true" not in d:
            d["target_true"] = d.pop("ground_truth")
        known = {"prompt", "subject", "target_new", "target_true", "case_id"}
        missing = [k for k in ("prompt", "subject", "target_new") if k not in d]
        if missing:
            raise EditError(f"edit request is missing field(s) {missing}: {dict(obj)!r:.200}")
        return cls(**{k: v for k, v in d.items() if k in known})
