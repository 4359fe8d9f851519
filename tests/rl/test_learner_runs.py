"""Whole RL runs of the learner in subprocesses: SIGKILL and resume, 2 hosts vs 1, and 2 hosts
with the judge overlapped (config.rl.async_rewards, rollouts in flight across a restart)
restarting from a gs:// workdir both hosts share.

Each run is `tests/learner_program.py` (random tiny policy, CapWorld judge, 2 prompts x G=4,
checkpoints every 2 steps) and prints a digest of its final params' bytes: equal digests mean
bitwise-equal params.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from balcap import metrics, paths
from balcap.data import datasets
from testlib import REPO, tiny_data_config

PROGRAM = str(REPO / "tests" / "learner_program.py")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  datasets.prepare(tiny_data_config(root))
  return str(root)


def _env(devices: int, **extra):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              PYTHONPATH=f"{REPO}:{REPO / 'tests'}", **extra)


def _start(workdir, tfds_dir, steps, *, devices=2, distributed=False, async_rewards=False,
           **env):
  args = [sys.executable, PROGRAM, str(workdir), tfds_dir, str(steps)]
  if distributed:
    args.append("distributed")
  if async_rewards:
    args.append("async")
  return subprocess.Popen(args, env=_env(devices, **env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(process):
  output = process.communicate(timeout=400)[0]
  assert process.returncode == 0, output
  result = [line.split()[1:] for line in output.splitlines() if line.startswith("RESULT")][0]
  digest = [line.split()[1] for line in output.splitlines() if line.startswith("PARAMS")][0]
  # After `learner.run` the caller's policy holds the trained params, not deleted buffers.
  handed_back = [line.split()[1] for line in output.splitlines() if line.startswith("POLICY")]
  assert handed_back in ([], [digest]), output
  return result, digest


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return [r["step"] for r in metrics.read_jsonl(path)] if os.path.exists(path) else []


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_hosts(workdir, tfds_dir, steps, **kwargs):
  port = _free_port()
  return [_start(workdir, tfds_dir, steps, devices=1, distributed=True,
                 JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i), **kwargs) for i in range(2)]


def test_a_run_killed_mid_step_resumes_to_bitwise_equal_params(tmp_path, tfds_dir):
  # With async_rewards the checkpoint also holds the next step's rollouts: that restart is
  # test_async_rewards_on_two_hosts_complete_and_resume_exactly's.
  uninterrupted = _start(tmp_path / "whole", tfds_dir, 6)  # alongside: compiles overlap
  killed = _start(tmp_path / "killed", tfds_dir, 6)
  deadline = time.time() + 300
  while 5 not in _logged_steps(tmp_path / "killed"):  # step 5 done, step 6 under way
    assert killed.poll() is None and time.time() < deadline, killed.communicate()[0]
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.communicate(timeout=60)
  whole = _finish(uninterrupted)
  assert whole[0] == ["None", "6"]
  resumed = _finish(_start(tmp_path / "killed", tfds_dir, 6))
  # From the last COMPLETE checkpoint (saves are asynchronous: step 4's may still have been
  # in flight when the kill came, never half-used), then on to the end.
  assert resumed[0] in (["2", "6"], ["4", "6"])
  assert resumed[1] == whole[1]


def test_one_step_on_two_hosts_equals_one_host(tmp_path, tfds_dir):
  one = _start(tmp_path / "one", tfds_dir, "one_step", devices=2)  # alongside the two hosts
  results = [_finish(host) for host in _start_hosts(tmp_path / "two", tfds_dir, "one_step")]
  one_host = _finish(one)
  assert results[0] == results[1]  # one replicated state
  assert results[0][0][1] == "1" and float(results[0][0][0]) > 0  # a step with signal
  assert results[0] == one_host  # same advantages (global statistics), same params


def test_async_rewards_on_two_hosts_complete_and_resume_exactly(tmp_path, tfds_dir,
                                                                  fake_gcs):
  whole = [_finish(host) for host in
           _start_hosts(tmp_path / "whole", tfds_dir, 4, async_rewards=True)]
  assert [result for result, _ in whole] == [["None", "4"]] * 2
  assert whole[0] == whole[1]  # one replicated state
  # The same run restarted from its step-2 checkpoint, which holds step 3's rollouts (sampled
  # ahead, before step 2's update, on both hosts): it ends where the uninterrupted run did.
  shutil.copytree(tmp_path / "whole", tmp_path / "restarted")
  shutil.rmtree(tmp_path / "restarted" / "checkpoints" / "4")
  # Restarted with the workdir in a bucket (the fake GCS server), shared by both hosts as on a
  # pod: orbax reads and writes it through tensorstore, the logs go through gcsfs.
  remote = f"gs://balcap-test/two_hosts/{tmp_path.name}"
  paths.upload_folder(tmp_path / "restarted", remote)
  logged = len(metrics.read_jsonl(f"{remote}/metrics.jsonl"))
  restarted = [_finish(host) for host in
               _start_hosts(remote, tfds_dir, 4, async_rewards=True, **fake_gcs)]
  assert [result for result, _ in restarted] == [["2", "4"]] * 2
  assert restarted[0][1] == whole[0][1]
  assert "4" in paths.listdir(f"{remote}/checkpoints")
  assert [r["step"] for r in metrics.read_jsonl(f"{remote}/metrics.jsonl")[logged:]] == [3, 4]
