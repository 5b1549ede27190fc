"""The internal document corpus the research agents search (seeded into the `documents` table).

PLACEHOLDER: filled in by the orchestrator work (issue #6)."""

from __future__ import annotations

from pydantic import BaseModel


class Document(BaseModel):
    id: str
    title: str
    tags: str = ""
    body: str


CORPUS: list[Document] = []
