"""A run whose workdir is gs://: every output goes to the bucket, and the run resumes from it.

The bucket is a fake GCS server (tests/fake_gcs.py) that gcsfs and tensorstore talk to with
their real clients; nothing is written to a local workdir. The checks read the outputs back
through the same path layer, from the test process.
"""

import json
import os
import subprocess
import sys

from balcap import metrics, paths
from test_main import _SMALL
from testlib import REPO

# Each test gets its own prefix in the session's bucket.
_BUCKET = "gs://balcap-test"


def _main(args, tmp_path, env, devices=1):
  env = dict(os.environ, **env, TFDS_DATA_DIR=str(tmp_path / "tfds"),
             BALCAP_CACHE=str(tmp_path / "cache"),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-m", "balcap.main", *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)


def test_demo_on_a_gs_workdir_writes_everything_there_resumes_and_evaluates(tmp_path, fake_gcs):
  workdir = f"{_BUCKET}/demo"
  command = [f"--config={REPO}/configs/tiny.py", *_SMALL, f"--workdir={workdir}"]
  done = _main(command, tmp_path, fake_gcs)
  assert done.returncode == 0, done.stderr[-3000:]
  assert not (tmp_path / "runs").exists()  # nothing went to the default local workdir

  assert json.loads(paths.read_text(f"{workdir}/config.json"))["mode"] == "train"
  assert paths.listdir(f"{workdir}/sft/checkpoints") == ["2", "3"]
  assert paths.listdir(f"{workdir}/rl/checkpoints") == ["2"]
  sft_log = metrics.read_jsonl(f"{workdir}/sft/metrics.jsonl")
  assert [r["step"] for r in sft_log] == [1, 2, 3]  # appended line by line, in order
  rl_log = [r for r in metrics.read_jsonl(f"{workdir}/rl/metrics.jsonl") if "texts" not in r]
  assert [r["step"] for r in rl_log] == [1, 2]
  assert len(metrics.read_jsonl(f"{workdir}/rl/samples.jsonl")) == 8
  assert paths.listdir(f"{workdir}/rl/tensorboard")  # tensorboardX's own gs:// writer
  summary = json.loads(paths.read_text(f"{workdir}/eval.json"))
  assert summary["after"]["examples"] == 4

  # The same command resumes every stage from the bucket's checkpoints.
  again = _main(command, tmp_path, fake_gcs)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "(resumed from step 3)" in again.stdout and "(resumed from step 2)" in again.stdout
  assert json.loads(paths.read_text(f"{workdir}/eval.json"))["after"] == summary["after"]
  assert [r["step"] for r in metrics.read_jsonl(f"{workdir}/sft/metrics.jsonl")] == [1, 2, 3]

  # mode eval reads the trained params from the bucket and writes its report there.
  scored = _main([f"--config={REPO}/configs/eval.py:model=tiny", f"--workdir={workdir}",
                  f"--config.eval.run={workdir}", "--config.eval.benchmarks=('capscore',)",
                  *_SMALL[:3], "--config.batch_size=4", "--config.sampling.max_new_tokens=8"],
                 tmp_path, fake_gcs)
  assert scored.returncode == 0, scored.stderr[-3000:]
  result = json.loads(paths.read_text(f"{workdir}/eval/capscore.json"))
  assert result["captioner"]["run"] == workdir and result["captioner"]["stage"] == "rl"
  assert result["scored"] == 4
  assert "b-CapScore" in paths.read_text(f"{workdir}/eval/report.md")
  assert len(paths.read_text(f"{workdir}/eval/captions.jsonl").splitlines()) == 4
