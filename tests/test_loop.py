"""The shared step loop: exact resume after a stop, SIGTERM and SIGKILL, on 8 devices."""

import os
import signal
import subprocess
import sys

import jax.numpy as jnp

from balcap import train
from loop_program import digest, run
from testlib import REPO


def test_fold_digest_is_order_sensitive_and_free_to_split():
  hashes = jnp.array(train.id_hashes([f"id{i}" for i in range(10)]))
  whole = train.fold_digest(jnp.uint32(0), hashes)
  split = train.fold_digest(train.fold_digest(jnp.uint32(0), hashes[:4]), hashes[4:])
  assert int(whole) == int(split)
  assert int(whole) != int(train.fold_digest(jnp.uint32(0), hashes[::-1]))


def test_a_stopped_run_resumes_to_the_same_state(tmp_path):
  uninterrupted = run(tmp_path / "a", 10)
  first = run(tmp_path / "b", 4)
  assert first.step == 4 and first.resumed_from is None
  resumed = run(tmp_path / "b", 10)
  assert resumed.resumed_from == 4 and resumed.step == 10
  assert digest(resumed) == digest(uninterrupted)
  assert digest(uninterrupted)[1] == 80  # 10 steps x 8 examples, across epochs of 37


def _start(workdir, num_steps):
  script = (f"from loop_program import run\nr = run({str(workdir)!r}, {num_steps}, "
            "step_delay=0.2)\nprint('DONE', r.step, r.preempted, flush=True)")
  return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}"))


def _wait_for_step(process, step):
  lines = []
  for line in process.stdout:
    lines.append(line)
    if line.strip() == f"STEP {step}":
      return lines
  raise AssertionError("child ended early:\n" + "".join(lines))


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
  process = _start(tmp_path, 12)
  _wait_for_step(process, 4)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 0, output
  stopped_at = int(output.split("DONE ")[1].split()[0])
  assert "DONE" in output and "True" in output.split("DONE")[1]
  assert 4 <= stopped_at < 12
  assert str(stopped_at) in os.listdir(tmp_path / "checkpoints")  # saved off the 3-step cycle
  resumed = run(tmp_path, 12)
  assert resumed.resumed_from == stopped_at
  assert digest(resumed) == digest(run(tmp_path / "fresh", 12))


def test_sigkill_loses_only_steps_after_the_last_checkpoint(tmp_path):
  process = _start(tmp_path, 12)
  _wait_for_step(process, 8)
  process.kill()
  process.communicate(timeout=60)
  resumed = run(tmp_path, 12)
  # Checkpoints every 3 steps: 6 unless the machine is so slow that its save was unfinished.
  assert resumed.resumed_from in (3, 6)
  assert digest(resumed) == digest(run(tmp_path / "fresh", 12))
