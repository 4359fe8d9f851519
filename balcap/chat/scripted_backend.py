"""A `ChatBackend` whose replies a Python function writes: for tests and dry runs of judges.

    backend = ScriptedChatBackend(lambda request: "Caption 1 is better")

The function sees each `ChatRequest` and returns the reply text; returning None or raising
makes that request fail ("judge_error"), as a real judge's broken answer would. Every request
is recorded in `requests` (in call order), so a test can check what was asked and that a
resumed run asks nothing twice.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from balcap.chat.protocol import ChatReply, ChatRequest


class ScriptedChatBackend:

  def __init__(self, respond: Callable[[ChatRequest], str | None]):
    self._respond = respond
    self.requests: list[ChatRequest] = []
    self._lock = threading.Lock()

  def complete(self, requests: Sequence[ChatRequest],
               deadline: float | None = None) -> list[ChatReply]:
    del deadline  # answers at once
    with self._lock:
      self.requests.extend(requests)
    replies = []
    for request in requests:
      try:
        text = self._respond(request)
      except Exception:  # pylint: disable=broad-except  (a broken answer, as from a real judge)
        text = None
      replies.append(ChatReply(request.id, text=text) if text is not None
                     else ChatReply(request.id, failure="judge_error"))
    return replies

  def close(self) -> None:
    pass
