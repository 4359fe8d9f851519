"""A `ChatBackend` for any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, hosted).

    backend = OpenAIChatBackend("http://judge:8000", "Qwen/Qwen2.5-VL-72B-Instruct",
                                api_key_env="JUDGE_API_KEY", cache_path="/runs/judge.sqlite")
    replies = backend.complete(requests)

One `complete` call spreads its requests over `max_concurrency` threads (kept-alive HTTP
connections), retries what a later try may fix (time-outs, connection errors, 5xx, 429) with
exponential backoff, fails the rest at once (other 4xx), and returns within `deadline_s` no
matter what the server does. The API key is read from the environment variable *named* by
`api_key_env` and goes into the Authorization header only: never into logs, errors or reprs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from typing import Any, Sequence

from balcap.chat import cache as cache_lib
from balcap.chat.protocol import ChatReply, ChatRequest

log = logging.getLogger(__name__)

# How much of an error body a log line shows: enough to see the server's reason.
_LOGGED_BODY_CHARS = 300


@dataclasses.dataclass(frozen=True)
class _Outcome:
  """What one HTTP attempt gave: the text, or a failure cause and whether to try again."""
  text: str | None = None
  cause: str | None = None
  retry: bool = False
  retry_after: float | None = None   # seconds, from the server's Retry-After header
  why: str = ""                      # for the log line; never holds the key


class OpenAIChatBackend:
  """POSTs `{base_url}/v1/chat/completions`; see the module docstring.

  Args:
    base_url: the server, with or without a trailing "/v1".
    model: the "model" field of each request (and part of the cache key).
    api_key_env: name of the environment variable holding the API key; None sends no key.
    timeout_s: the limit of one HTTP attempt (connect + answer).
    max_concurrency: requests in flight at once (threads, connections).
    max_retries: tries after the first for a retryable failure.
    backoff_s: the first retry's wait; doubled each retry, plus up to 50% seeded jitter.
    deadline_s: `complete` returns within this, unfinished requests failing with "timeout".
    temperature, max_tokens: sampling params for requests that leave them None.
    cache_path: an sqlite reply cache (see cache.py); None disables caching.
    retry_after_cap_s: the longest a server's Retry-After header may make us wait.
    seed: seeds the backoff jitter, so reruns wait the same.
  """

  def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None,
               timeout_s: float = 60.0, max_concurrency: int = 64, max_retries: int = 3,
               backoff_s: float = 0.5, deadline_s: float = 600.0, temperature: float = 0.0,
               max_tokens: int = 1024, cache_path: str | None = None,
               retry_after_cap_s: float = 30.0, seed: int = 0):
    if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0 or deadline_s <= 0:
      raise ValueError("need max_concurrency >= 1, max_retries >= 0, timeout_s > 0 and "
                       "deadline_s > 0")
    parts = urllib.parse.urlsplit(base_url.strip().rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
      raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
    prefix = parts.path.rstrip("/")
    prefix = prefix[:-len("/v1")] if prefix.endswith("/v1") else prefix
    self.base_url = f"{parts.scheme}://{parts.netloc}{prefix}"
    self._https = parts.scheme == "https"
    self._host, self._port = parts.hostname, parts.port
    self._path = f"{prefix}/v1/chat/completions"
    self.model = model
    self.timeout_s, self.deadline_s = float(timeout_s), float(deadline_s)
    self.max_concurrency, self.max_retries = int(max_concurrency), int(max_retries)
    self.backoff_s, self.retry_after_cap_s = float(backoff_s), float(retry_after_cap_s)
    self.temperature, self.max_tokens = temperature, max_tokens
    self.api_key_env = api_key_env
    self._secret = None
    if api_key_env is not None:
      self._secret = os.environ.get(api_key_env)
      if not self._secret:
        raise ValueError(f"environment variable {api_key_env} (the judge's API key) is not set")
    self._cache = cache_lib.ResponseCache(cache_path) if cache_path else None
    self._rng = random.Random(seed)
    self._rng_lock = threading.Lock()
    self._idle: list[http.client.HTTPConnection] = []   # kept-alive connections, LIFO
    self._idle_lock = threading.Lock()

  def __repr__(self) -> str:
    return (f"OpenAIChatBackend(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r})")

  def complete(self, requests: Sequence[ChatRequest],
               deadline: float | None = None) -> list[ChatReply]:
    """One reply per request, in order; returns within `deadline_s`, or by `deadline` (a
    time.monotonic() instant, e.g. the judge's) if that is earlier (see chat.py)."""
    own = time.monotonic() + self.deadline_s
    deadline = own if deadline is None else min(own, deadline)
    replies: list[ChatReply | None] = [None] * len(requests)
    keys: list[str | None] = [None] * len(requests)
    if self._cache is not None:
      keys = [self._cache_key(r) for r in requests]
      hits = self._cache.get_many(keys)
      for i, (request, key) in enumerate(zip(requests, keys)):
        if key in hits:
          replies[i] = ChatReply(request.id, text=hits[key])
    todo = [i for i, reply in enumerate(replies) if reply is None]
    if todo:
      pool = concurrent.futures.ThreadPoolExecutor(
          max_workers=min(len(todo), self.max_concurrency), thread_name_prefix="judge-http")
      futures = {pool.submit(self._complete_one, requests[i], keys[i], deadline): i
                 for i in todo}
      done, late = concurrent.futures.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
      # Started stragglers stop by themselves: every wait they make is capped by `deadline`.
      pool.shutdown(wait=False, cancel_futures=True)
      why = {}
      for future in done:
        i = futures[future]
        replies[i], why[requests[i].id] = future.result()
      for future in late:
        i = futures[future]
        replies[i] = ChatReply(requests[i].id, failure="timeout")
        why[requests[i].id] = "unfinished at the deadline"
      self._log_failures(replies, why)
    return replies

  def _log_failures(self, replies: list[ChatReply], why: dict[str, str]) -> None:
    """One warning per call, not per request: a dead judge would otherwise flood the log."""
    failed = [r for r in replies if not r.ok]
    if not failed:
      return
    causes = collections.Counter(r.failure for r in failed)
    log.warning("judge: %d of %d requests failed (%s); e.g. %s: %s", len(failed), len(replies),
                ", ".join(f"{c}: {n}" for c, n in sorted(causes.items())), failed[0].id,
                why.get(failed[0].id, ""))

  def close(self) -> None:
    with self._idle_lock:
      idle, self._idle = self._idle, []
    for connection in idle:
      connection.close()
    if self._cache is not None:
      self._cache.close()

  def _params(self, request: ChatRequest) -> dict[str, Any]:
    params = {"temperature": self.temperature if request.temperature is None
                             else request.temperature,
              "max_tokens": self.max_tokens if request.max_tokens is None else request.max_tokens}
    if request.seed is not None:
      params["seed"] = request.seed  # vLLM and SGLang honour it; it also keys the cache
    return params

  def _cache_key(self, request: ChatRequest) -> str:
    return cache_lib.cache_key(self.model, request.version, request.messages,
                               self._params(request))

  def _complete_one(self, request: ChatRequest, key: str | None,
                    deadline: float) -> tuple[ChatReply, str]:
    """Tries until success, a final failure, or the deadline: (reply, why it failed).

    Never raises."""
    try:
      body = json.dumps({"model": self.model, "messages": list(request.messages),
                         **self._params(request)}).encode("utf-8")
      attempt = 0
      while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          return ChatReply(request.id, failure="timeout"), "deadline passed between tries"
        outcome = self._post(body, min(self.timeout_s, remaining))
        if outcome.text is not None:
          if self._cache is not None:
            self._cache.put(key, outcome.text)
          return ChatReply(request.id, text=outcome.text), ""
        tries = f"{outcome.why} ({attempt + 1} tries)"
        if not outcome.retry or attempt >= self.max_retries:
          log.debug("judge request %s failed: %s", request.id, tries)
          return ChatReply(request.id, failure=outcome.cause), tries
        wait = self._backoff(attempt, outcome.retry_after)
        if time.monotonic() + wait >= deadline:
          log.debug("judge request %s failed, no time left to retry: %s", request.id, tries)
          return ChatReply(request.id, failure=outcome.cause), tries
        log.debug("judge request %s: %s; retry %d in %.2f s", request.id, outcome.why,
                  attempt + 1, wait)
        time.sleep(wait)
        attempt += 1
    except Exception as e:  # pylint: disable=broad-except
      # A bug here must cost one request, not the batch; the message cannot hold the key
      # (the key only ever sits in a header dict built inside _post).
      why = f"client error {type(e).__name__}: {self._redact(str(e))}"
      log.error("judge request %s: %s", request.id, why)
      return ChatReply(request.id, failure="judge_error"), why

  def _backoff(self, attempt: int, retry_after: float | None) -> float:
    with self._rng_lock:
      jitter = self._rng.uniform(0.0, 0.5)
    wait = self.backoff_s * (2 ** attempt) * (1.0 + jitter)
    if retry_after is not None:
      wait = max(wait, min(retry_after, self.retry_after_cap_s))
    return wait

  def _connection(self, timeout: float) -> http.client.HTTPConnection:
    with self._idle_lock:
      connection = self._idle.pop() if self._idle else None
    if connection is None:
      cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
      connection = cls(self._host, self._port, timeout=timeout)
    elif connection.sock is not None:
      connection.sock.settimeout(timeout)
    connection.timeout = timeout  # used if it has to reconnect
    return connection

  def _release(self, connection: http.client.HTTPConnection) -> None:
    with self._idle_lock:
      if len(self._idle) < self.max_concurrency:
        self._idle.append(connection)
        return
    connection.close()

  def _post(self, body: bytes, timeout: float) -> _Outcome:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self._secret:
      headers["Authorization"] = f"Bearer {self._secret}"
    for fresh_try in (False, True):
      connection = self._connection(timeout)
      reused = connection.sock is not None
      try:
        connection.request("POST", self._path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
      except TimeoutError:
        connection.close()
        return _Outcome(cause="timeout", retry=True, why=f"no answer within {timeout:.2f} s")
      except (OSError, http.client.HTTPException) as e:
        connection.close()
        # A kept-alive connection the server has since closed is not the server failing.
        if reused and not fresh_try and isinstance(
            e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)):
          continue
        return _Outcome(cause="http_error", retry=True,
                        why=f"connection error {type(e).__name__}: {self._redact(str(e))}")
      self._release(connection)
      return self._read(response, data)
    raise AssertionError("unreachable")

  def _read(self, response: http.client.HTTPResponse, data: bytes) -> _Outcome:
    status = response.status
    if status == 200:
      return self._content(data)
    why = f"HTTP {status}: {self._redact(data[:_LOGGED_BODY_CHARS].decode('utf-8', 'replace'))}"
    if status == 429 or status >= 500:
      return _Outcome(cause="http_error", retry=True,
                      retry_after=_retry_after(response.getheader("Retry-After")), why=why)
    return _Outcome(cause="http_error", why=why)

  def _content(self, data: bytes) -> _Outcome:
    try:
      content = json.loads(data)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
      return _Outcome(cause="judge_error", why="200 without a chat-completions body: "
                      + self._redact(data[:_LOGGED_BODY_CHARS].decode("utf-8", "replace")))
    if isinstance(content, list):  # content parts, as some servers send them
      content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
      return _Outcome(cause="judge_error", why=f"message content is {type(content).__name__}")
    return _Outcome(text=content)

  def _redact(self, text: str) -> str:
    """`text` without the API key: servers sometimes echo request headers in errors."""
    return text.replace(self._secret, "<api key>") if self._secret else text


def _retry_after(value: str | None) -> float | None:
  """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())
