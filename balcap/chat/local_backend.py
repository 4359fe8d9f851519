"""A balcap policy as the judge model: chat requests answered through balcap's own sampler.

For TPU setups without a serving stack: the judge (say, a Qwen2.5-VL-7B checkpoint) runs on the
same devices as the learner, as greedy decoding in padded batches. Requests are rendered with
the policy's own chat template: the system message becomes the system prompt, the user turns'
text is joined, and their images (data URLs) are decoded and attached.

`rl.rewards.llm_judge.LocalJudge(policy)` is `LLMJudge(LocalChatBackend(policy), name="local")`:
the same prompts, parsing and accounting as the HTTP judge. It decodes greedily: requests
that differ only in temperature or seed get the same answer.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import time
from typing import Any, Sequence

import jax
from PIL import Image

from balcap import parallel, sampling
from balcap.chat.protocol import ChatReply, ChatRequest

log = logging.getLogger(__name__)


def render(request: ChatRequest) -> tuple[str | None, str, list[Image.Image]]:
  """(system prompt, user text, images) of an OpenAI-format request.

  Every non-system turn's text is kept in order (a reminder turn follows the question it
  refers to); turns other than the user's are labelled with their role.
  """
  system, texts, images = None, [], []
  for message in request.messages:
    role, content = message["role"], message["content"]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    if role == "system":
      system = "\n".join(p["text"] for p in parts if p.get("type") == "text")
      continue
    for part in parts:
      if part.get("type") == "text":
        texts.append(part["text"] if role == "user" else f"[{role}] {part['text']}")
      elif part.get("type") == "image_url":
        images.append(_decode_image(part["image_url"]["url"]))
      else:
        raise ValueError(f"request {request.id}: unsupported content part {part.get('type')!r}")
  return system, "\n\n".join(texts), images


def _decode_image(url: str) -> Image.Image:
  if not url.startswith("data:"):
    raise ValueError("a local judge takes images as data URLs, not links to fetch")
  data = base64.b64decode(url.split(",", 1)[1])
  with Image.open(io.BytesIO(data)) as image:
    return image.convert("RGB")


class LocalChatBackend:
  """`ChatBackend` over a balcap policy with a processor (see the module docstring).

  Requests are answered greedily in chunks of `batch_size`, grouped by what one sampler
  program shares (system prompt, sampling settings, with or without an image). The deadline
  is checked between chunks: a chunk that has started runs to the end, the ones not started
  by the deadline become "timeout" replies. A chunk that fails (a malformed request, a model
  error) becomes "judge_error" replies for its requests only.

  The sampler's programs span the whole mesh, so on several hosts they are collectives
  (`collective`): every host must run the same programs in the same order, or the pod
  deadlocks. So this backend must be called from the thread that runs the other device work
  (`JudgeReward` runs a collective judge on the calling thread, `LLMJudge` keeps its rounds in
  step over hosts), and each call here agrees with the other hosts on one schedule: the union
  of the hosts' groups, the largest host's chunk count per group, chunks padded to
  `batch_size` rows, and each deadline decision. A host with fewer requests runs padding
  chunks whose answers it drops.
  """

  def __init__(self, policy, *, max_new_tokens: int = 512, batch_size: int = 16,
               deadline_s: float = 600.0, seed: int = 0):
    if policy.processor is None:
      raise ValueError("a local judge needs a policy with a processor (tokenizer files)")
    self.policy = policy
    self.max_new_tokens = max_new_tokens
    multiple = parallel.host_rows_multiple(policy.mesh)
    self.batch_size = -(-batch_size // multiple) * multiple  # rows split over the shards
    self.deadline_s = deadline_s
    self._rng = jax.random.key(seed)
    self._processors: dict[str | None, Any] = {}

  @property
  def collective(self) -> bool:
    """Whether a call must be made in step on every host (see the class docstring)."""
    return jax.process_count() > 1

  def _processor(self, system: str | None):
    if system not in self._processors:
      processor = copy.copy(self.policy.processor)
      if system is not None:
        processor.system_prompt = system
      self._processors[system] = processor
    return self._processors[system]

  def complete(self, requests: Sequence[ChatRequest],
               deadline: float | None = None) -> list[ChatReply]:
    """Replies in request order, by `deadline` (time.monotonic()) or `deadline_s` from now,
    whichever is earlier (for the chunks not yet started)."""
    end = time.monotonic() + self.deadline_s
    end = end if deadline is None else min(end, deadline)
    replies: dict[str, ChatReply] = {}
    rendered = {}
    for request in requests:
      try:
        rendered[request.id] = render(request)
      except (ValueError, KeyError, OSError) as e:
        log.warning("local judge: cannot render request %s: %s", request.id, e)
        replies[request.id] = ChatReply(request.id, failure="judge_error")
    groups: dict[str, list[ChatRequest]] = {}
    for request in requests:
      if request.id in rendered:
        system, _, images = rendered[request.id]
        key = json.dumps([system, request.temperature or 0.0,
                          request.max_tokens or self.max_new_tokens, bool(images)])
        groups.setdefault(key, []).append(request)
    for key in parallel.host_union(list(groups)):   # the same order on every host
      group = groups.get(key, [])
      chunks = parallel.host_max(-(-len(group) // self.batch_size))
      for start in range(0, chunks * self.batch_size, self.batch_size):
        chunk = group[start:start + self.batch_size]
        (expired,) = parallel.host_any([time.monotonic() > end])
        if expired:
          replies.update({r.id: ChatReply(r.id, failure="timeout") for r in chunk})
          continue
        replies.update(self._answer(chunk, rendered, key))
    return [replies[r.id] for r in requests]

  def _answer(self, chunk, rendered, key: str) -> dict[str, ChatReply]:
    system, temperature, max_tokens, with_image = json.loads(key)
    processor = self._processor(system)
    rows = [rendered[r.id] for r in chunk]
    # Padding rows (a short or, on another host's behalf, empty chunk): their answers are
    # dropped, but they keep the program's shape equal on every host.
    blank = (system, "", [Image.new("RGB", (56, 56), (128, 128, 128))] if with_image else [])
    rows += [blank] * (self.batch_size - len(rows) if self.policy.mesh is not None
                       else 0 if rows else 1)
    replies: dict[str, ChatReply] = {}
    try:
      batch = _processed(processor, rows, with_image)
    except (ValueError, TypeError):
      # Some row the processor refuses (a caption holding a special token, say): it fails
      # alone and a blank row takes its place, so this host still runs the program below in
      # step with the others.
      for i, request in enumerate(chunk):
        try:
          _processed(processor, [rows[i]], with_image)
        except (ValueError, TypeError) as e:
          log.warning("local judge: request %s cannot be processed: %s", request.id, e)
          replies[request.id] = ChatReply(request.id, failure="judge_error")
          rows[i] = blank
      batch = _processed(processor, rows, with_image)
    self._rng, rng = jax.random.split(self._rng)  # split alike on every host
    try:
      rollouts = sampling.generate(self.policy, self.policy.params, batch, rng,
                                   max_new_tokens=min(max_tokens, self.max_new_tokens),
                                   temperature=temperature)
      tokens = parallel.host_local(rollouts.tokens)
      lengths = parallel.host_local(rollouts.lengths)
    except Exception:  # pylint: disable=broad-except
      log.exception("local judge: a chunk of %d requests failed", len(chunk))
      return {r.id: ChatReply(r.id, failure="judge_error") for r in chunk}
    for i, request in enumerate(chunk):
      replies.setdefault(request.id, ChatReply(
          request.id, text=processor.decode(tokens[i, :lengths[i]])))
    return replies


def _processed(processor, rows, with_image: bool) -> dict[str, Any]:
  """The processor batch of rendered rows (system, text, images)."""
  return processor(prompts=[text for _, text, _ in rows],
                   images=[images for _, _, images in rows] if with_image else None)
