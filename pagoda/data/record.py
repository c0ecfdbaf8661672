"""What flows through `pagoda data prepare`: a text record with its lineage, and a stage's drop.

Every stage of the pipeline is a plain function over records. A per-record step maps one
`Record` to a new `Record` (the text changed or checked; its name appended to `steps`) or to a
`Drop` naming the stage and the reason, which the manifest counts. Records are values: a step
returns a new one instead of mutating its input, so a step can run in a worker process and the
same input always gives the same output (runs are byte-identical).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Record:
    """One document of a corpus.

    `source` says where it came from (a file path, `path:line` for a JSONL record, a URL, an
    upload id) and is kept to the output; `meta` holds what stages learned (language, PII counts,
    page, title); `steps` is the lineage, the names of the steps applied, in order.
    """

    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    steps: tuple[str, ...] = ()

    def evolve(self, step: str, text: str | None = None, **meta: Any) -> Record:
        """A copy after `step`: its name appended to the lineage, optionally new text and meta."""
        return replace(self, text=self.text if text is None else text,
                       meta={**self.meta, **meta} if meta else self.meta,
                       steps=(*self.steps, step))

    @property
    def content_hash(self) -> str:
        """SHA-256 of the text (UTF-8), hex: the record's identity in the output."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """The output line: text, source, content hash, lineage, then the stages' metadata."""
        return {"text": self.text, "source": self.source, "hash": self.content_hash,
                "steps": list(self.steps), **{k: v for k, v in self.meta.items()
                                              if k not in ("text", "source", "hash", "steps")}}


@dataclass(frozen=True)
class Drop:
    """A record leaves the dataset at `stage` because of `reason` (a short, countable phrase)."""

    stage: str
    reason: str


Step = Callable[[Record], Record | Drop]  # a per-record stage, run in worker processes
