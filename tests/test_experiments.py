"""experiments/: the runner (killed and run again: nothing finished is redone), the shared SFT,
the aggregate's statistics and claims, and the plots."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import aggregate, run, spec
from testlib import REPO

SMOKE = os.path.join(REPO, "experiments", "smoke.py")


def _commands_logged(folder):
  with open(os.path.join(folder, "stdout.log"), encoding="utf-8") as f:
    return [line for line in f if line.startswith("$ ")]


def test_the_runner_killed_and_run_again_redoes_nothing_finished(tmp_path):
  workdir, results = tmp_path / "runs", tmp_path / "results"
  command = [sys.executable, "-m", "experiments.run", SMOKE, f"--workdir={workdir}",
             f"--results={results}"]
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  experiment = spec.load(SMOKE)
  layout = run.Layout(experiment, str(workdir))
  first_arm = layout.arm(experiment.arm("c_gdpo"), 0)
  # Killed (the whole process group, as a pre-empted machine would) once the first arm is done.
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
  deadline = time.time() + 400
  while not spec.is_done(first_arm) and process.poll() is None and time.time() < deadline:
    time.sleep(0.5)
  os.killpg(process.pid, signal.SIGKILL)
  output = process.communicate()[0]
  assert spec.is_done(first_arm), output[-3000:]

  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=400)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "c_gdpo seed 0: done before, skipped" in done.stdout
  # The SFT ran once (sft, export) and both arms started from its export.
  sft = layout.sft(experiment.arm("c_gdpo"), 0)
  assert layout.sft(experiment.arm("grpo"), 0) == sft
  assert ": done before, skipped" in done.stdout.splitlines()[1]  # the SFT, first
  assert len(_commands_logged(sft)) == 2
  assert len(_commands_logged(first_arm)) == 1
  export = os.path.join(sft, "export")
  befores = []
  for arm in experiment.arms:
    folder = layout.arm(arm, 0)
    (line,) = _commands_logged(folder)[-1:]
    assert f"--config.model.checkpoint={export}" in line
    with open(os.path.join(folder, "run", "eval.json"), encoding="utf-8") as f:
      befores.append(json.load(f)["before"])
  # Same SFT params, same greedy captions of the same 4 test images before RL.
  assert befores[0]["examples"] == 4 and befores[0]["b_capscore"] == befores[1]["b_capscore"]

  text = (results / "summary.md").read_text()
  assert "| c-GDPO |" in text and "| GRPO |" in text
  assert "**c-GDPO beats GRPO on b-CapScore** — " in text
  with open(results / "metrics.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [(r["arm"], r["seed"]) for r in rows] == [("c_gdpo", "0"), ("grpo", "0")]
  assert all(0 <= float(r["precision"]) <= 1 and r["meta"] != "" for r in rows)
  for png in ("final.png", "curves.png"):
    assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _runs(values_by_arm, metric="b_capscore"):
  return {arm: {seed: {"before": {"b_capscore": 40.0}, "after": {metric: v},
                       "seconds": 60.0, "curves": {}}
                for seed, v in enumerate(values)}
          for arm, values in values_by_arm.items()}


def test_a_claim_is_judged_on_paired_differences_with_a_t_interval():
  claim = spec.Claim("a beats b", "a", "b", "b_capscore")
  # Differences 2, 3, 4: mean 3, sd 1, t(0.975, 2) = 4.303 -> half-width 4.303 / sqrt(3).
  result = aggregate.check_claim(claim, _runs({"a": [52, 53, 54], "b": [50, 50, 50]}))
  assert result["verdict"] == "reproduced"
  assert result["mean_difference"] == pytest.approx(3.0)
  assert result["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
  # Same mean, but the seeds disagree: the interval includes zero.
  noisy = aggregate.check_claim(claim, _runs({"a": [60, 45, 54], "b": [50, 50, 50]}))
  assert noisy["verdict"] == "same direction, not significant at 95%"
  assert aggregate.check_claim(claim, _runs({"a": [48, 49], "b": [50, 50]}))["verdict"] == (
      "not reproduced")
  lower = spec.Claim("a is shorter", "a", "b", "length_error", lower=True)
  result = aggregate.check_claim(lower, _runs({"a": [0.1, 0.2, 0.1], "b": [0.5, 0.6, 0.7]},
                                              "length_error"))
  assert result["verdict"] == "reproduced"


def test_arms_with_the_same_sft_flags_share_one_sft_per_seed(tmp_path):
  experiment = spec.Experiment(
      name="x", description="", base="configs/tiny.py", seeds=(0, 1),
      arms=(spec.Arm("a"), spec.Arm("b", ("--config.advantage.estimator=grpo",)),
            spec.Arm("long", sft_flags=("--config.sft.num_steps=5",))))
  layout = run.Layout(experiment, str(tmp_path))
  jobs = run.plan(layout, (0, 1))
  sfts = [j for j in jobs if j.label.startswith("SFT")]
  assert len(sfts) == 4 and len(jobs) == 10  # 2 SFTs x 2 seeds, 3 arms x 2 seeds
  by_label = {j.label: j for j in jobs}
  a, b, long = experiment.arms
  assert by_label["a seed 1"].needs == by_label["b seed 1"].needs == layout.sft(a, 1)
  assert by_label["long seed 1"].needs == layout.sft(long, 1) != layout.sft(a, 1)
  assert "--config.sft.num_steps=5" in by_label["long seed 1"].commands[0]
  # Another experiment with the same base and flags finds the same runs; other flags, others.
  other = spec.Experiment(name="y", description="", base="configs/tiny.py",
                          arms=(spec.Arm("a"),))
  assert run.Layout(other, str(tmp_path)).arm(other.arms[0], 0) == layout.arm(a, 0)
  assert run.Layout(other, str(tmp_path), ("--config.rl.num_steps=9",)).arm(
      other.arms[0], 0) != layout.arm(a, 0)


def test_a_bad_experiment_names_its_problem():
  with pytest.raises(ValueError, match="claim 'c' names arm 'z'"):
    spec.Experiment(name="x", description="", base="configs/tiny.py", arms=(spec.Arm("a"),),
                    claims=(spec.Claim("c", "a", "z", "b_capscore"),))
  with pytest.raises(ValueError, match="is not a --config"):
    spec.Experiment(name="x", description="", base="configs/tiny.py",
                    arms=(spec.Arm("a", ("rl.num_steps=3",)),))


def _with_flags(config, flags):
  """The config `--config.<path>=<value>` flags give (values typed like the field's, as
  ml_collections' flag parser types them)."""
  import ast  # pylint: disable=import-outside-toplevel
  from ml_collections.config_flags import config_path  # pylint: disable=import-outside-toplevel
  for flag in flags:
    path, _, raw = flag[len("--config."):].partition("=")
    current = config_path.get_value(path, config)
    value = raw if isinstance(current, str) else ast.literal_eval(raw)
    config_path.set_value(path, config, value)
  return config


@pytest.mark.parametrize("name", ["advantage", "length", "rewards"])
def test_every_arm_of_the_shipped_ablations_is_a_valid_config(name):
  from balcap import configs  # pylint: disable=import-outside-toplevel
  from balcap.rl import advantages  # pylint: disable=import-outside-toplevel
  from testlib import load_config_file  # pylint: disable=import-outside-toplevel
  experiment = spec.load(os.path.join(REPO, "experiments", f"{name}.py"))
  assert len(experiment.seeds) >= 3 and experiment.claims
  for arm in experiment.arms:
    config = _with_flags(load_config_file("tiny"),
                         experiment.flags + arm.sft_flags + arm.flags)
    configs.validate(config, num_devices=1, process_count=1)
    advantages.from_config(config.advantage)  # raises on an inconsistent arm
