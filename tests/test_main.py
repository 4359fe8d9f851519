"""`python -m balcap.main`: the demo, mode dispatch and config errors, as a user sees them."""

import json
import os
import subprocess
import sys

from balcap import metrics
from testlib import REPO

# Small enough for the test suite; the README's command runs configs/tiny.py as it is.
_SMALL = ["--config.num_steps=6", "--config.batch_size=8", "--config.checkpoint.every_steps=4",
          "--config.data.capworld.num_train=40", "--config.data.capworld.num_validation=4",
          "--config.data.capworld.num_test=4"]


def balcap_main(*args, tmp_path, cwd=REPO):
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  return subprocess.run([sys.executable, "-m", "balcap.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_demo_command_runs_the_stages_that_exist_and_resumes(tmp_path):
  workdir = tmp_path / "runs" / "tiny"  # the default: runs/<config name> under the cwd
  done = balcap_main(f"--config={REPO}/configs/tiny.py", *_SMALL, tmp_path=tmp_path,
                     cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  out = done.stdout
  assert "[1/4] data: capworld/n40-4-4_112x112" in out and "'train': 40" in out
  assert "[2/4] SFT warm start: not in this version" in out
  assert "6/6 steps, 48 examples read" in out
  assert json.loads((workdir / "config.json").read_text())["num_steps"] == 6
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
  logged = metrics.read_jsonl(str(workdir / "metrics.jsonl"))
  assert [r["step"] for r in logged] == [5, 6]  # every 5 steps (tiny.py) and the last
  assert all(r["data/reference_words_mean"] > 5 for r in logged)
  # The same command again finds the finished run and does not redo it.
  again = balcap_main(f"--config={REPO}/configs/tiny.py", *_SMALL, tmp_path=tmp_path,
                      cwd=tmp_path)
  assert again.returncode == 0 and "resumed from step 6" in again.stdout
  assert out.split("id digest ")[1][:8] == again.stdout.split("id digest ")[1][:8]


def test_mode_argument_selects_the_mode(tmp_path):
  done = balcap_main("--config=configs/tiny.py:mode=data", f"--workdir={tmp_path / 'run'}",
                     *_SMALL, tmp_path=tmp_path)
  assert done.returncode == 0, done.stderr
  assert "validation: 4 examples" in done.stdout and "test: 4 examples" in done.stdout


def test_a_mode_this_version_lacks_says_what_it_needs(tmp_path):
  done = balcap_main("--config=configs/tiny.py:mode=eval", tmp_path=tmp_path)
  assert done.returncode == 1
  assert "config.mode='eval' needs the rewards and judges" in done.stderr
  assert "modes available: ['caption', 'data', 'train']" in done.stderr


def test_config_errors_name_the_field_and_the_fix_before_any_work(tmp_path):
  done = balcap_main("--config=configs/tiny.py", "--config.batch_size=12",
                     "--config.mesh.fsdp=8", f"--workdir={tmp_path / 'run'}", tmp_path=tmp_path)
  assert done.returncode == 1
  assert "config.batch_size=12 does not divide over the 8 data shards" in done.stderr
  assert not (tmp_path / "run").exists()
  typo = balcap_main("--config=configs/tiny.py", "--config.num_stpes=3", tmp_path=tmp_path)
  assert typo.returncode != 0 and "num_stpes" in typo.stderr


def test_bad_data_is_a_message_not_a_traceback(tmp_path):
  manifest = tmp_path / "manifest.jsonl"
  manifest.write_text('{"id": "a", "image": "a.jpg", "reference": "r"}\n' * 2)
  done = balcap_main("--config=configs/tiny.py:mode=data", "--config.data.name=caption_folder",
                     f"--config.data.caption_folder.manifest={manifest}",
                     f"--workdir={tmp_path / 'run'}", tmp_path=tmp_path)
  assert done.returncode == 1
  assert "balcap: " in done.stderr and "'a' on lines [1, 2]" in done.stderr
  assert "Traceback" not in done.stderr
  missing = balcap_main("--config=configs/tiny.py:mode=data", "--config.data.name=caption_folder",
                        f"--config.data.caption_folder.manifest={tmp_path / 'nope.jsonl'}",
                        tmp_path=tmp_path)
  assert "nope.jsonl': no such file" in missing.stderr and "Traceback" not in missing.stderr
