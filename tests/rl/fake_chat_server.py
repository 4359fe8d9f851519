"""A local OpenAI-style chat-completions server that plays a judge, for tests and benchmarks.

It answers balcap's judge prompts (prompts.py) by a toy rule, so a test knows every score:
  decompose  the text split at "." and ";": each non-empty piece is one assertion;
  verify     verified unless the assertion says "unicorn"; pointable unless it says "mood",
             "depth" or "image shows";
  cover      a unit is covered when the caption contains it (case-insensitive);
  rate       clarity 5, fluency 4, coherence 3 (linguistic 0.75); "clumsy" captions 2, 2, 2
             (0.25).
Any other chat is echoed back ("echo: <last user text>").

It misbehaves on cue words in a request's input text (caption, reference, assertions):
  SLOW      answers after `slow_s`;          ERROR500 / ERROR429 / ERROR400  that status;
  GARBLED   a non-JSON reply unless the request is a reminder retry;   GARBAGE  never JSON.
A `script(request) -> Reply | None` hook overrides the rules per test. Every request is
recorded (`requests`, `count`). Run alone, it prints its port and serves until killed:
    python tests/rl/fake_chat_server.py
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import random
import re
import sys
import threading
import time
from typing import Any, Callable

from balcap.rl.rewards import prompts

_TAGGED = re.compile(r"<(text|assertions|caption|units)>\n(.*?)\n</\1>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Reply:
  """What the server sends: `content` as a chat completion, else `body` with `status`."""
  content: str | None = None
  status: int = 200
  body: Any = None
  headers: dict = dataclasses.field(default_factory=dict)
  delay_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Request:
  """One request as the server saw it."""
  task: str | None          # a prompts.TASKS name, None for a non-judge chat
  text: str                 # the input the cues are read from
  inputs: dict              # tag -> value (JSON-decoded for lists)
  is_retry: bool            # carries the judge's parse-retry reminder
  body: dict
  headers: dict
  time: float


# The toy judge.


def toy_assertions(text: str) -> list[str]:
  return [p.strip() for p in re.split(r"[.;]", text) if p.strip()]


def toy_verdict(assertion: str) -> dict[str, bool]:
  lower = assertion.lower()
  return {"verified": "unicorn" not in lower,
          "pointable": not any(w in lower for w in ("mood", "depth", "image shows"))}


def toy_covered(unit: str, caption: str) -> bool:
  return unit.lower() in caption.lower()


def toy_ratings(caption: str) -> dict[str, int]:
  if "clumsy" in caption.lower():
    return {"clarity": 2, "fluency": 2, "coherence": 2}
  return {"clarity": 5, "fluency": 4, "coherence": 3}


def toy_answer(request: Request) -> str:
  inputs = request.inputs
  if request.task == "decompose":
    return json.dumps(toy_assertions(inputs["text"]))
  if request.task == "verify":
    return json.dumps([toy_verdict(a) for a in inputs["assertions"]])
  if request.task == "cover":
    return json.dumps([toy_covered(u, inputs["caption"]) for u in inputs["units"]])
  if request.task == "rate":
    return json.dumps(toy_ratings(inputs["caption"]))
  return f"echo: {request.text}"


def _text_of(content: Any) -> str:
  if isinstance(content, str):
    return content
  return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")


def read_request(body: dict, headers: dict) -> Request:
  messages = body["messages"]
  task = next((t for t, system in prompts.SYSTEM_PROMPTS.items()
               if messages[0].get("content") == system), None)
  user = _text_of(messages[1]["content"] if task else messages[-1]["content"])
  inputs = {}
  for tag, value in _TAGGED.findall(user):
    inputs[tag] = json.loads(value) if tag in ("assertions", "units") else value
  if task == "verify":
    image = messages[1]["content"][0]["image_url"]["url"]
    assert image.startswith("data:image/"), "the verify prompt must carry the image"
  text = {"decompose": inputs.get("text"), "verify": " ".join(inputs.get("assertions", [])),
          "cover": inputs.get("caption"), "rate": inputs.get("caption")}.get(task, user)
  is_retry = bool(task) and len(messages) > 2
  return Request(task, text or "", inputs, is_retry, body, headers, time.monotonic())


def default_reply(request: Request, slow_s: float, retry_after: str | None) -> Reply:
  text = request.text
  if "ERROR400" in text:
    # Echoes the request headers, as some proxies do: the client must not log the key.
    return Reply(status=400, body={"error": {"message": "bad request",
                                             "headers": request.headers}})
  if "ERROR500" in text:
    return Reply(status=500, body={"error": {"message": "internal error"}})
  if "ERROR429" in text:
    return Reply(status=429, body={"error": {"message": "slow down"}},
                 headers={"Retry-After": retry_after} if retry_after else {})
  if "GARBAGE" in text or ("GARBLED" in text and not request.is_retry):
    return Reply(content="I think the answer is: {assertions: one, two")
  return Reply(content=toy_answer(request), delay_s=slow_s if "SLOW" in text else 0.0)


class FakeChatServer:
  """A ThreadingHTTPServer on 127.0.0.1 (a free port) in a daemon thread; a context manager.

  Args:
    slow_s: how long SLOW requests wait.
    retry_after: the Retry-After header of ERROR429 replies (None: no header).
    latency_s: every reply waits uniform(0, latency_s), seeded: replies come back out of order.
    script: request -> Reply, or None for the default behaviour.
  """

  def __init__(self, *, slow_s: float = 2.0, retry_after: str | None = None,
               latency_s: float = 0.0, seed: int = 0,
               script: Callable[[Request], Reply | None] | None = None, port: int = 0):
    self.slow_s, self.retry_after, self.latency_s = slow_s, retry_after, latency_s
    self.script = script
    self.requests: list[Request] = []
    self._lock = threading.Lock()
    self._rng = random.Random(seed)
    self._stop = threading.Event()
    self._httpd = _Server(("127.0.0.1", port), self._handler_class())
    self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                    kwargs={"poll_interval": 0.05})

  def __enter__(self) -> "FakeChatServer":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()   # wakes sleeping handlers
    self._httpd.shutdown()
    self._httpd.server_close()

  def count(self, task: str | None = "any", contains: str = "") -> int:
    """Requests seen for `task` ("any": all) whose input text contains `contains`."""
    with self._lock:
      return sum((task == "any" or r.task == task) and contains in r.text
                 for r in self.requests)

  def _respond(self, body: dict, headers: dict) -> Reply:
    request = read_request(body, headers)
    with self._lock:
      self.requests.append(request)
      latency = self._rng.uniform(0.0, self.latency_s) if self.latency_s else 0.0
    reply = (self.script(request) if self.script else None) or default_reply(
        request, self.slow_s, self.retry_after)
    if reply.delay_s or latency:
      self._stop.wait(reply.delay_s + latency)
    return reply

  def _handler_class(self):
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"   # keep-alive, as real servers do

      def do_POST(self):  # pylint: disable=invalid-name
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/chat/completions":
          self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
          return
        reply = server._respond(json.loads(data), dict(self.headers))
        if reply.content is not None:
          body = {"id": "fake", "object": "chat.completion", "choices": [
              {"index": 0, "finish_reason": "stop",
               "message": {"role": "assistant", "content": reply.content}}]}
        else:
          body = reply.body
        self._send(reply.status, body, reply.headers)

      def _send(self, status, body, headers):
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        try:
          self.send_response(status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          for name, value in headers.items():
            self.send_header(name, value)
          self.end_headers()
          self.wfile.write(data)
        except OSError:
          pass   # the client gave up (its timeout); nothing to tell it

      def log_message(self, *args):  # quiet: tests capture logs
        pass

    return Handler


class _Server(http.server.ThreadingHTTPServer):
  # A benchmark opens 64 connections at once; the default backlog of 5 would drop some.
  request_queue_size = 256
  daemon_threads = True


if __name__ == "__main__":
  with FakeChatServer() as fake:
    print(fake.url.rsplit(":", 1)[1], flush=True)
    try:
      while True:
        time.sleep(3600)
    except KeyboardInterrupt:
      sys.exit(0)
