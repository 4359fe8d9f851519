"""Asking a judge many questions: batches, retries until a reply parses, failures kept.

Every evaluator turns its items into `Ask`s (the messages, how to parse the reply, the
sampling params) and gets back, per ask, the parsed value or an `Unanswered` saying why.
A reply that does not parse is asked again with a reminder of the format, up to `tries`
times in all; a transport failure (time-out, HTTP error) is asked again as it was. Nothing
raises for one bad item: the caller reports its `Unanswered` by id.

Resuming is the backend's reply cache: a re-run sends the same requests (same messages,
params, prompt version and seed), and the cache answers every one already answered.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from balcap.chat.protocol import ChatBackend, ChatRequest
from balcap.evals import prompts

DEFAULT_TRIES = 5


@dataclasses.dataclass(frozen=True)
class Ask:
  id: str
  messages: Sequence[dict]
  parse: Callable[[str], Any]         # raises ValueError when the reply is unusable
  temperature: float | None = 0.0
  max_tokens: int | None = None
  seed: int | None = None
  retry_unparsable: bool = True       # False: an unparsable reply is final (CaptionQA)


@dataclasses.dataclass(frozen=True)
class Unanswered:
  cause: str                          # "unparsable" or a chat failure (timeout, http_error...)
  detail: str
  reply: str | None = None            # the last reply's text, when there was one


def ask_all(backend: ChatBackend, asks: Sequence[Ask], *, tries: int = DEFAULT_TRIES,
            chunk_size: int = 512, progress: Callable[[int], None] | None = None
            ) -> dict[str, Any]:
  """id -> parsed value or `Unanswered`, for every ask. `progress(n)`: n asks settled."""
  if tries < 1:
    raise ValueError(f"tries must be at least 1, got {tries}")
  ids = [a.id for a in asks]
  if len(set(ids)) != len(ids):
    raise ValueError("ask ids must be unique within one call")
  results: dict[str, Any] = {}
  # (ask, messages to send): a parse failure's retry carries a reminder of the format.
  pending = [(ask, list(ask.messages)) for ask in asks]
  for attempt in range(tries):
    retry = []
    for start in range(0, len(pending), chunk_size):
      chunk = pending[start:start + chunk_size]
      requests = [ChatRequest(ask.id, messages, temperature=ask.temperature,
                              max_tokens=ask.max_tokens, version=prompts.PROMPT_VERSION,
                              seed=ask.seed) for ask, messages in chunk]
      replies = backend.complete(requests)
      settled = 0
      for (ask, messages), reply in zip(chunk, replies):
        if reply.id != ask.id:
          raise AssertionError(f"the backend answered {reply.id!r} for {ask.id!r}")
        last = attempt == tries - 1
        if not reply.ok:
          if last:
            results[ask.id] = Unanswered(reply.failure, "no reply after "
                                         f"{tries} tries")
            settled += 1
          else:
            retry.append((ask, messages))
          continue
        try:
          results[ask.id] = ask.parse(reply.text)
          settled += 1
        except ValueError as e:
          if last or not ask.retry_unparsable:
            results[ask.id] = Unanswered("unparsable", str(e), reply.text)
            settled += 1
          else:
            retry.append((ask, prompts.with_reminder(ask.messages, str(e))))
      if progress is not None and settled:
        progress(settled)
    pending = retry
    if not pending:
      break
  return results
