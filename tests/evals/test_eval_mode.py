"""Mode `eval` end to end, through the real CLI: a run's trained params caption the three
benchmarks' fixtures and CapWorld's test split, a local OpenAI-compatible server plays the
judge, and the outputs hold every field; a re-run asks the server nothing it already
answered, and another model's captions file is scored by the same path."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from balcap import checkpoint, models
from evals import benchmark_fixtures, scripted_judge
from rl.fake_chat_server import FakeChatServer, Reply
from testlib import REPO, load_config_file

BENCHMARKS = ("dcscore", "captionqa", "caparena", "capscore", "classic")


def _fake_run(folder) -> None:
  """A `train` workdir as the learner leaves it: an rl checkpoint with params and the config."""
  config = load_config_file("tiny")
  policy = models.policy_from_config(config.model, jax.random.key(7))
  with checkpoint.Checkpointer(os.path.join(folder, "rl", "checkpoints"),
                               async_save=False) as store:
    store.save(3, {"params": policy.params, "step": np.int32(3)}, config=config)


def _judge(request):
  return Reply(content=scripted_judge.answer(request.body["messages"]))


def _eval(tmp_path, workdir, server_url, *args):
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
      [sys.executable, "-m", "balcap.main", "--config=configs/eval.py:model=tiny",
       f"--workdir={workdir}",
       f"--config.eval.decapbench={tmp_path / 'decap'}",
       f"--config.eval.captionqa={tmp_path / 'cqa'}",
       f"--config.eval.caparena={tmp_path / 'arena'}",
       f"--config.eval.judge.base_url={server_url}", "--config.eval.judge.model=scripted",
       f"--config.eval.judge.cache_path={tmp_path / 'judge_cache.sqlite'}",
       "--config.data.capworld.num_train=8", "--config.data.capworld.num_validation=2",
       "--config.data.capworld.num_test=3", "--config.batch_size=2",
       "--config.sampling.max_new_tokens=8", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_eval_scores_a_runs_checkpoint_on_every_benchmark_and_resumes_from_the_cache(tmp_path):
  benchmark_fixtures.decapbench(str(tmp_path / "decap"), 2)
  benchmark_fixtures.captionqa(str(tmp_path / "cqa"), 2)
  benchmark_fixtures.caparena(str(tmp_path / "arena"), 3)
  _fake_run(tmp_path / "run")
  out = tmp_path / "run" / "eval"
  with FakeChatServer(script=_judge) as server:
    done = _eval(tmp_path, tmp_path / "run", server.url, f"--config.eval.run={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    asked = server.count()
    # 2 DeCapBench images x (decompose + 3 match + 3 verify) at most, 6 questions, 3 battles.
    assert 6 + 3 <= asked <= 2 * 7 + 6 + 3

    results = {b: json.loads((out / f"{b}.json").read_text()) for b in BENCHMARKS}
    for name, result in results.items():
      for field in ("benchmark", "score", "captioner", "judge", "caption_length", "seconds",
                    "seconds_per_caption"):
        assert field in result, (name, field)
      assert result["captioner"]["stage"] == "rl" and result["captioner"]["step"] == 3
      assert result["caption_length"]["words"]["median"] >= 0
      assert result["caption_length"]["tokens"]["mean"] >= 0  # the policy's tokenizer
      assert (out / f"{name}.jsonl").read_text().strip()
    for name in ("dcscore", "captionqa", "caparena"):
      judge = results[name]["judge"]
      assert judge["model"] == "scripted" and judge["prompt_version"] == "balcap-eval-v1"
      assert judge["seed"] == 0 and judge["tries"] == 5
    assert results["dcscore"]["items"] == 2 and "invalid_ids" in results["dcscore"]
    assert results["captionqa"]["questions"] == 6 and set(results["captionqa"]["domains"]) == {
        "natural", "document"}
    assert results["caparena"]["images"] == 3 and -100 <= results["caparena"]["score_avg"] <= 100
    assert results["capscore"]["scored"] == 3 and results["capscore"]["judge"][
        "rewards_judge"] == "capworld"
    capscore_rows = [json.loads(l) for l in (out / "capscore.jsonl").read_text().splitlines()]
    assert all(r["id"].startswith("capworld-test-") for r in capscore_rows)
    assert set(results["classic"]["sources"]) == {"capworld:test", "decapbench", "caparena"}
    report = (out / "report.md").read_text()
    for label in ("DCScore", "CaptionQA", "CapArena-Auto", "b-CapScore", "CIDEr-D"):
      assert label in report
    captions = (out / "captions.jsonl").read_text().splitlines()
    assert len(captions) == 2 + 2 + 3 + 3

    # Killed after its first captions, in the middle of writing the fourth: the re-run captions
    # only the rest, and the judge's cache answers everything (greedy captions are the same,
    # so are the requests).
    (out / "captions.jsonl").write_text("\n".join(captions[:3]) + "\n" + captions[3][:20])
    (out / "caparena.json").unlink()
    again = _eval(tmp_path, tmp_path / "run", server.url, f"--config.eval.run={tmp_path / 'run'}",
                  "--config.eval.benchmarks=('dcscore','captionqa','caparena','capscore')")
    assert again.returncode == 0, again.stderr[-3000:]
    assert server.count() == asked
    assert sorted((out / "captions.jsonl").read_text().splitlines()) == sorted(captions)
    for name in BENCHMARKS[:-1]:
      assert json.loads((out / f"{name}.json").read_text())["score"] == results[name]["score"]

    # Another model's captions, scored by the same judge (its cache shared). Its DeCapBench
    # captions are the oracle captions: 2 facts, both verified and matched, of 3 oracle facts:
    # P 1, R 2/3, F1 = F1_rel = 0.8 -> DCScore 80.0; the rest are the run's, scored as before.
    theirs = tmp_path / "theirs.jsonl"
    rows = [json.loads(line) for line in captions]
    for row in rows:
      if row["benchmark"] == "dcscore":
        row["caption"] = f"A red cube {row['id'][2]}. A blue ball."
    # Its CapWorld captions are each image's first reference: exact (precision 1, linguistic 1).
    rows += [{"benchmark": "capscore", "id": r["id"], "caption": r["references"][0]}
             for r in capscore_rows]
    theirs.write_text("".join(json.dumps({k: r[k] for k in ("benchmark", "id", "caption")})
                              + "\n" for r in rows))
    scored = _eval(tmp_path, tmp_path / "theirs", server.url, f"--config.eval.captions={theirs}",
                   "--config.eval.benchmarks=('dcscore','captionqa','caparena','capscore',"
                   "'classic')")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert server.count() == asked + 2 * 7  # DeCapBench's new captions only
    mine = {n: json.loads((tmp_path / "theirs" / "eval" / f"{n}.json").read_text())
            for n in BENCHMARKS}
    assert mine["capscore"]["precision"] == 1.0 and mine["capscore"]["linguistic"] == 1.0
    assert mine["capscore"]["scored"] == 3 and mine["capscore"]["b_capscore"] > 0
    assert abs(mine["dcscore"]["score"] - 80.0) < 1e-5
    assert abs(mine["dcscore"]["recall"] - 200 / 3) < 1e-9 and mine["dcscore"]["precision"] == 100
    for name in ("captionqa", "caparena"):
      assert mine[name]["score"] == results[name]["score"], name
    assert mine["classic"]["sources"]["decapbench"]["pure_python"]["cider_d"] > 0
    assert mine["dcscore"]["captioner"] == {"captions": str(theirs)}
    assert mine["dcscore"]["caption_length"]["words"]["mean"] == 7.0
