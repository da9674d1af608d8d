"""Answers drawn from private documents, remembered so that a conversation quoting them stays on
the device.

An answer the device wrote with private chunks in its prompt (or in a conversation that already
held such an answer) may repeat private text. Clients send it back as history on the next turn
(the console, `tandem chat`, OpenAI clients), and that turn's retrieval, which looks only at the
last user message, finds nothing private: without this record the history went to the cloud.

Guarantees:
- `remember(text)` keeps the answer's text (whitespace collapsed) in memory, on the device, for
  the orchestrator's lifetime: the last `MAX_ANSWERS` answers, at most `MAX_CHARS` characters
  each (of a longer one its beginning is kept: a message holding the whole answer still
  matches).
- `found_in(messages)` is True when any message's content (whitespace collapsed):
  - equals a remembered answer, or
  - holds a remembered answer of at least `MIN_MATCH` characters, or
  - of at least `MIN_MATCH` characters, starts a remembered answer (a client that cut the answer
    short, at a stop sequence or a cancel, sends back its beginning).
- Thread-safe. Nothing is written to disk: after a restart, earlier answers are not known (the
  README says so).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping

MAX_ANSWERS = 512
MAX_CHARS = 65_536
MIN_MATCH = 16


def _norm(text: str) -> str:
    return " ".join(text.split())


class PrivateAnswers:
    """The device's recent answers drawn from private documents (see the module doc)."""

    def __init__(self, max_answers: int = MAX_ANSWERS) -> None:
        self._answers: deque[str] = deque(maxlen=max_answers)
        self._lock = threading.Lock()

    def remember(self, text: str) -> None:
        answer = _norm(text)[:MAX_CHARS]
        if answer:
            with self._lock:
                self._answers.append(answer)

    def found_in(self, messages: Iterable[Mapping[str, str]]) -> bool:
        contents = [c for c in (_norm(m.get("content", "")) for m in messages) if c]
        if not contents:
            return False
        with self._lock:
            answers = list(self._answers)
        return any(_quotes(content, answer) for content in contents for answer in answers)

    def __len__(self) -> int:
        with self._lock:
            return len(self._answers)


def _quotes(content: str, answer: str) -> bool:
    if content == answer:
        return True
    if len(answer) >= MIN_MATCH and answer in content:
        return True
    return len(content) >= MIN_MATCH and answer.startswith(content)
