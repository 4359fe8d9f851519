"""The chat backend protocol, shared by the reward judges (`rl/rewards/`) and the benchmark
evaluators (`evals/`): a batch of chat requests in, one reply (text or cause) each out.

`LLMJudge` talks to its judge model only through `ChatBackend.complete`, so any model that
answers OpenAI-format chat messages can judge: an HTTP endpoint (`openai_backend.py`) or a
local model. A backend owes its caller three things:

  1. one `ChatReply` per request, in request order, carrying the request's `id`;
  2. no exception for one request that failed: a `ChatReply` with a `failure` cause instead;
  3. a bounded call: it returns by its own deadline or the caller's `deadline` (a
     `time.monotonic()` instant), whichever is earlier, turning unfinished requests into
     "timeout" failures.

Batching the whole judge batch into one call lets a backend spread it over its concurrency
(threads for HTTP, one padded batch for a local sampler).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence

# Why a backend gave no text. "judge_error" is for a judge that answered outside the protocol
# (a 200 whose body has no choices, a local model that crashed on one request).
CHAT_FAILURES = ("timeout", "http_error", "judge_error")

# One OpenAI-format chat message: {"role": "system" | "user" | "assistant", "content": str or
# a list of content parts such as {"type": "text", ...} / {"type": "image_url", ...}}.
Message = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """One chat completion to make. Sampling params left None take the backend's defaults."""
  id: str                        # "<sample id>#<task>": unique within one complete() call
  messages: Sequence[Message]
  temperature: float | None = None
  max_tokens: int | None = None
  # Keys the reply cache besides the messages: `version` names the prompt wording (bump it to
  # ask again), `seed` tells apart repeated samples of one request (DCScore asks three times at
  # temperature 1.0) and is sent to servers that take it.
  version: str = ""
  seed: int | None = None


@dataclasses.dataclass(frozen=True)
class ChatReply:
  """The answer to the request with the same `id`: `text`, or the `failure` cause."""
  id: str
  text: str | None = None
  failure: str | None = None     # one of CHAT_FAILURES when text is None

  def __post_init__(self):
    if (self.text is None) == (self.failure is None):
      raise ValueError(f"reply {self.id!r} needs exactly one of text and failure")
    if self.failure is not None and self.failure not in CHAT_FAILURES:
      raise ValueError(f"unknown chat failure {self.failure!r}; known: {CHAT_FAILURES}")

  @property
  def ok(self) -> bool:
    return self.text is not None


class ChatBackend(Protocol):
  """Answers chat requests; see the module docstring for what a backend guarantees."""

  def complete(self, requests: Sequence[ChatRequest],
               deadline: float | None = None) -> list[ChatReply]: ...
