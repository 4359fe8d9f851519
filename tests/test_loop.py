"""The shared step loop: exact resume after a stop, SIGTERM and SIGKILL, on 8 devices."""

import os
import signal
import socket
import subprocess
import sys

import jax.numpy as jnp
import pytest

from loop_program import digest, fold_digest, id_hashes, run
from testlib import REPO


def test_fold_digest_is_order_sensitive_and_free_to_split():
  hashes = jnp.array(id_hashes([f"id{i}" for i in range(10)]))
  whole = fold_digest(jnp.uint32(0), hashes)
  split = fold_digest(fold_digest(jnp.uint32(0), hashes[:4]), hashes[4:])
  assert int(whole) == int(split)
  assert int(whole) != int(fold_digest(jnp.uint32(0), hashes[::-1]))


def test_a_stopped_run_resumes_to_the_same_state(tmp_path):
  uninterrupted = run(tmp_path / "a", 10)
  first = run(tmp_path / "b", 4)
  assert first.step == 4 and first.resumed_from is None
  resumed = run(tmp_path / "b", 10)
  assert resumed.resumed_from == 4 and resumed.step == 10
  assert digest(resumed) == digest(uninterrupted)
  assert digest(uninterrupted)[1] == 80  # 10 steps x 8 examples, across epochs of 37


def test_resuming_into_a_state_of_other_parts_names_them(tmp_path):
  run(tmp_path, 3)
  with pytest.raises(ValueError, match=r"only in this run: \['inflight'\].*async_rewards"):
    run(tmp_path, 6, extra_state={"inflight": jnp.zeros(2)})


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


_TWO_HOST_RUN = """
import sys
from balcap import parallel
assert parallel.initialize_distributed()
from loop_program import digest, run
result = run(sys.argv[1], int(sys.argv[2]))
print("RESULT", result.resumed_from, result.step, *digest(result), flush=True)
"""


def _two_hosts(workdir, num_steps):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_HOST_RUN, str(workdir), str(num_steps)],
                            env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=180)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
  results = [line.split()[1:] for out in outputs for line in out.splitlines()
             if line.startswith("RESULT")]
  assert len(results) == 2 and results[0] == results[1], results  # one replicated state
  return results[0]


def test_two_hosts_checkpoint_their_own_data_state_and_resume_exactly(tmp_path):
  whole = _two_hosts(tmp_path / "whole", 7)
  assert whole[:2] == ["None", "7"] and whole[3] == "56"
  first = _two_hosts(tmp_path / "split", 4)
  data_files = sorted(n for n in os.listdir(tmp_path / "split" / "checkpoints" / "4" / "data")
                      if n.startswith("process_"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
  resumed = _two_hosts(tmp_path / "split", 7)
  assert first[:2] == ["None", "4"] and resumed[:2] == ["4", "7"]
  assert resumed[2:] == whole[2:]
