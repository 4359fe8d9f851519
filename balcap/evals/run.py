"""Mode `eval`: the paper's measures of one captioner, with one command.

    python -m balcap.main --config=configs/eval.py --config.eval.run=runs/qwen7b ...
    python -m balcap.main --config=configs/eval.py --config.eval.captions=theirs.jsonl ...

1. Captions: read from `config.eval.captions` (any model's, {"id", "caption"[, "benchmark"]}),
   or made greedily by the trained params of the run in `config.eval.run` (its latest stage
   checkpoint), or by config.model. Made captions go to `<workdir>/eval/captions.jsonl` as
   they are made, so a killed evaluation captions only what is missing when run again.
2. Each benchmark of `config.eval.benchmarks` is scored: DCScore, CaptionQA, CapArena-Auto
   (the judge in config.eval.judge, its replies cached in sqlite: a re-run asks the server only
   what it never answered), b-CapScore (the rewards' judge on config.data's test split) and the
   classic reference metrics (against the references of every benchmark run: DeCapBench's
   oracle captions, CapArena's human captions and, with b-CapScore, config.data's).
3. `<workdir>/eval/<benchmark>.json` (score, sub-scores, items, invalid ids, judge and prompt
   version, seeds, caption length, time), `<benchmark>.jsonl` (one row per item) and
   `report.md` (one table over everything in the folder).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from PIL import Image

from balcap import caption, configs, metrics, models, parallel, paths, trained
from balcap.chat import openai_backend
from balcap.evals import benchmark_data, benchmarks, classic, prompts, report

CAPTIONS = "captions.jsonl"
CAPTIONER = "captioner.json"


@dataclasses.dataclass(frozen=True)
class Needed:
  """An image the evaluation needs a caption of."""
  benchmark: str
  id: str
  image: Callable[[], Image.Image]   # loads it (raises OSError when it cannot)


def run(config, workdir: str) -> dict[str, Any]:
  if jax.process_count() > 1:
    raise configs.BalcapError(
        "mode eval runs on one host: caption with mode caption on the pod (each host writes "
        "its share), then score the captions here with --config.eval.captions=<file>")
  out = os.path.join(workdir, "eval")
  paths.makedirs(out)
  e = config.eval
  data = _benchmark_data(config)
  policy, captioner = _captioner(config)
  tokenizer = policy.processor if policy is not None else _tokenizer_only(config)
  if e.captions:
    captions = read_captions(e.captions)
  else:
    captions = _make_captions(policy, config, data, out, captioner)
  backend = _judge(config, out) if any(b in e.benchmarks for b in benchmarks.DRIVERS) else None
  results = {}
  try:
    for name in e.benchmarks:
      started = time.time()
      summary, rows, texts = _score(name, config, workdir, data, captions, backend, policy)
      seconds = time.time() - started
      result = {
          "benchmark": name, "score": summary.get(report.MAIN_SCORE[name]), **summary,
          "captioner": captioner,
          "judge": _judge_record(config, name),
          "caption_length": caption_length(texts, tokenizer),
          "seconds": round(seconds, 2),
          "seconds_per_caption": round(seconds / max(len(texts), 1), 4)}
      results[name] = _plain(result)
      _write(out, name, results[name], rows)
      print(f"eval: {name} {report.format_score(result)} on {len(texts)} captions in "
            f"{result['seconds']:.1f}s -> {out}/{name}.json", flush=True)
  finally:
    if backend is not None:
      backend.close()
  table = report.write(out)
  print(f"eval: report in {out}/report.md\n{table}", flush=True)
  return results


# --- captions ---------------------------------------------------------------------------------


def read_captions(path: str) -> dict[tuple[str, str], str]:
  """{(benchmark or "", id): caption} from a JSONL file; rows with "error" are left out (their
  items become invalid: "no caption")."""
  captions = {}
  with paths.open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        if "error" in row:
          continue
        key = (str(row.get("benchmark", "")), str(row["id"]))
        if not isinstance(row["caption"], str):
          raise TypeError("caption is not a string")
      except (ValueError, KeyError, TypeError) as e:
        raise configs.BalcapError(
            f"{path}:{number}: not a caption row ({e}); each line must be a JSON object "
            '{"id": ..., "caption": ...} with an optional "benchmark"') from e
      captions[key] = row["caption"]
  return captions


def captions_for(captions: dict[tuple[str, str], str], benchmark: str) -> dict[str, str]:
  """The captions of one benchmark: rows naming it, else rows naming no benchmark."""
  mine = {i: c for (b, i), c in captions.items() if b == ""}
  mine.update({i: c for (b, i), c in captions.items() if b == benchmark})
  return mine


def _captioner(config) -> tuple[models.Policy | None, dict[str, Any]]:
  e = config.eval
  if e.captions:
    return None, {"captions": _absolute(e.captions)}
  mesh = parallel.make_mesh(config.mesh)
  if e.run:
    source = trained.find(e.run, e.stage, e.step)
    policy = trained.load(source, mesh=mesh, base=config.model.checkpoint)
    described = {"run": _absolute(e.run), "stage": source.stage, "step": source.step}
  else:
    policy = models.policy_from_config(config.model, jax.random.key(config.seed), mesh=mesh)
    described = {"model": config.model.checkpoint}  # validate() asks for one
  if policy.processor is None:
    raise configs.BalcapError("mode eval captions with a tokenizer: set config.model.tokenizer")
  s = config.sampling
  described.update(prompt=s.prompt, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                   seed=config.seed)
  return policy, described


def _absolute(path: str) -> str:
  return path if paths.is_remote(path) else os.path.abspath(path)


def _tokenizer_only(config):
  """The policy's tokenizer for counting tokens of captions from a file, when one is set."""
  folder = config.model.tokenizer or config.model.checkpoint
  if not folder or not models.policy.has_tokenizer(folder):
    return None
  if config.model.checkpoint:
    family = models.policy.checkpoint_config(folder)[0]
  elif config.model.architecture:
    family = models.family_of(config.model.architecture.family)
  else:
    return None
  return family.processor_from_pretrained(folder, config.model)


def _make_captions(policy, config, data, out: str, captioner: dict) -> dict:
  """Captions of every needed image, made in full batches; those in `out`/captions.jsonl from
  an earlier (killed) run of the same captioner are kept."""
  path, meta = os.path.join(out, CAPTIONS), os.path.join(out, CAPTIONER)
  if paths.exists(meta):
    before = json.loads(paths.read_text(meta))
    if before != captioner:
      raise configs.BalcapError(
          f"{path} holds captions of another captioner ({before}, now {captioner}); use a new "
          f"--workdir, or delete {path} and {meta} to caption again")
  paths.write_text(meta, json.dumps(captioner, indent=2))
  captions = {}
  if paths.exists(path):
    lines = paths.read_text(path).splitlines()
    kept = []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:  # the line a killed run was writing: captioned again
        continue
      captions[(row["benchmark"], row["id"])] = row.get("caption")
      kept.append(line)
    if len(kept) != len(lines):
      paths.write_text(path, "".join(line + "\n" for line in kept))
  needed = [n for n in _needed(config, data) if (n.benchmark, n.id) not in captions]
  if needed:
    batch_size = parallel.host_batch_size(config.batch_size)
    bar = metrics.ProgressBar(len(needed), description="eval captions", unit="image")
    rng = jax.random.key(config.seed)
    f = paths.LineAppender(path)
    try:
      for number, start in enumerate(range(0, len(needed), batch_size)):
        chunk = needed[start:start + batch_size]
        rows = [(n, caption.read_image(n.image)) for n in chunk]
        rows += [(None, None)] * (batch_size - len(rows))
        made = caption.caption_rows(policy, caption.sampler_images(rows), config,
                                    jax.random.fold_in(rng, number))
        for (n, image), row in zip(rows, made):
          if n is None:
            continue
          entry = ({"caption": row["caption"], "num_tokens": row["num_tokens"]}
                   if isinstance(image, Image.Image) else {"caption": None, "error": image})
          f.write([json.dumps({"benchmark": n.benchmark, "id": n.id, **entry})], flush=False)
          captions[(n.benchmark, n.id)] = entry["caption"]
        f.flush()  # per batch: a killed run keeps every finished batch
        bar.update(len(chunk))
    finally:
      f.close()
    bar.close()
  return {k: c for k, c in captions.items() if c is not None}


def _needed(config, data) -> Iterator[Needed]:
  """The images of every benchmark run, each once per benchmark that scores it."""
  for name, items in data.items():
    if name == "capscore":
      for example in items:
        yield Needed(name, str(example["id"]), lambda a=example["image"]: Image.fromarray(
            np.asarray(a)))
    else:
      for item in items:
        yield Needed(name, item.id, functools.partial(caption.open_file, item.image_path))


# --- data, judge, scoring ------------------------------------------------------------------------


def _limit(items, n: int):
  return items if n < 0 else items[:n]


def _benchmark_data(config) -> dict[str, list]:
  """Each judged benchmark's items, and config.data's test split for b-CapScore and classic."""
  e, data = config.eval, {}
  loaders = {"dcscore": (benchmark_data.load_decapbench, e.decapbench),
             "captionqa": (benchmark_data.load_captionqa, e.captionqa),
             "caparena": (benchmark_data.load_caparena, e.caparena)}
  for name in e.benchmarks:
    if name in loaders:
      load, folder = loaders[name]
      data[name] = _limit(load(folder), e.num_examples)
  if "capscore" in e.benchmarks:  # (classic then also scores against its references)
    from balcap.data import datasets, pipeline  # pylint: disable=import-outside-toplevel
    split = datasets.open_split(datasets.prepare(config.data), config.data.test_split)
    data["capscore"] = [pipeline.decode_strings(split[i])
                        for i in _limit(range(len(split)), e.num_examples)]
  return data


def _judge(config, out: str) -> openai_backend.OpenAIChatBackend:
  j = config.eval.judge
  return openai_backend.OpenAIChatBackend(
      j.base_url, j.model, api_key_env=j.api_key_env or None, timeout_s=j.timeout_s,
      max_concurrency=j.max_concurrency, max_retries=j.max_retries,
      deadline_s=max(j.timeout_s * (j.max_retries + 1) * 2, 600.0), max_tokens=1024,
      cache_path=paths.local_mirror(j.cache_path or os.path.join(out, "judge_cache.sqlite")),
      seed=j.seed)


def _judge_record(config, name: str) -> dict[str, Any]:
  if name in benchmarks.DRIVERS:
    j = config.eval.judge
    return {"model": j.model, "base_url": j.base_url, **prompts.describe(), "seed": j.seed,
            "tries": j.tries, "image_detail": j.image_detail}
  if name == "capscore":
    r = config.rewards
    return {"rewards_judge": r.judge, "model": r.openai.model if r.judge == "openai" else None}
  return {"model": None}  # classic metrics need no judge


def _score(name: str, config, workdir: str, data, captions, backend, policy):
  """(summary, rows, the captions scored) of one benchmark."""
  if name in benchmarks.DRIVERS:
    items, mine = data[name], captions_for(captions, name)
    total = benchmarks.expected_asks(name, items)
    bar = metrics.ProgressBar(total, description=name, unit="ask")
    j = config.eval.judge
    settings = benchmarks.JudgeSettings(tries=j.tries, image_detail=j.image_detail,
                                        seed=j.seed, progress=bar.update)
    summary, rows = benchmarks.DRIVERS[name](backend, items, mine, settings)
    bar.close()
    return summary, rows, [mine[i.id] for i in items if i.id in mine]
  examples, mine = data["capscore"], captions_for(captions, "capscore")
  if name == "capscore":
    return _capscore(config, workdir, examples, mine, policy)
  sources = classic_sources(data, captions, f"{config.data.name}:{config.data.test_split}")
  summary, rows = classic.evaluate(sources)
  texts = [c for _, pairs in sources.items() for c, _ in pairs.values()]
  return summary, rows, texts


def classic_sources(data, captions, data_label: str
                    ) -> dict[str, dict[str, tuple[str, list[str]]]]:
  """{source: {id: (caption, references)}} for every source with reference captions: the data
  set's references, DeCapBench's oracle captions, CapArena's human captions."""
  sources = {}
  if "capscore" in data:
    mine = captions_for(captions, "capscore")
    sources[data_label] = {
        str(x["id"]): (mine[str(x["id"])], [str(r) for r in x["references"]])
        for x in data["capscore"] if str(x["id"]) in mine}
  if "dcscore" in data:
    mine = captions_for(captions, "dcscore")
    sources["decapbench"] = {i.id: (mine[i.id], [i.oracle_caption]) for i in data["dcscore"]
                             if i.id in mine}
  if "caparena" in data:
    mine = captions_for(captions, "caparena")
    sources["caparena"] = {i.id: (mine[i.id], [i.human]) for i in data["caparena"]
                           if i.id in mine}
  return {k: v for k, v in sources.items() if v}


def _capscore(config, workdir, examples, mine, policy):
  from balcap.evals import captioning  # pylint: disable=import-outside-toplevel
  from balcap.rl.rewards import factory  # pylint: disable=import-outside-toplevel
  reward = factory.reward_from_config(config, os.path.join(workdir, "eval"),
                                      processor=policy.processor if policy else None,
                                      mesh=policy.mesh if policy else None)
  kept = [x for x in examples if str(x["id"]) in mine]
  texts = [mine[str(x["id"])] for x in kept]
  summary, rows = captioning.score_captions(reward, kept, texts)
  missing = sorted(str(x["id"]) for x in examples if str(x["id"]) not in mine)
  summary.update(items=len(examples), invalid=len(missing), invalid_ids=missing)
  return summary, rows, texts


# --- outputs ----------------------------------------------------------------------------------


def caption_length(texts: list[str], tokenizer) -> dict[str, Any]:
  """Words and policy tokens per caption, mean and median (tokens None without a tokenizer)."""
  def stats(values):
    return ({"mean": float(np.mean(values)), "median": float(statistics.median(values))}
            if values else None)
  words = [len(t.split()) for t in texts]
  tokens = ([len(tokenizer.tokenizer.encode(t, add_special_tokens=False).ids) for t in texts]
            if tokenizer is not None else [])
  return {"captions": len(texts), "words": stats(words),
          "tokens": stats(tokens) if tokenizer is not None else None}


def _plain(value: Any) -> Any:
  """JSON-safe: numpy numbers as Python ones, NaN (nothing could be scored) as null."""
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (np.floating, float)):
    return None if np.isnan(value) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


def _write(out: str, name: str, result: dict, rows: list[dict]) -> None:
  paths.write_text(os.path.join(out, f"{name}.json"),
                   json.dumps(result, indent=2, allow_nan=False))
  paths.write_text(os.path.join(out, f"{name}.jsonl"),
                   "".join(json.dumps(_plain(row), allow_nan=False) + "\n" for row in rows))
