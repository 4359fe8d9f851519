"""`python -m balcap.main`: the demo (on a gs:// workdir), mode dispatch and config errors,
as a user sees them."""

import json
import os
import subprocess
import sys

from balcap import metrics, paths
from testlib import REPO

# Small enough for the test suite; the README's command runs configs/tiny.py as it is.
_DATA = ["--config.data.capworld.num_train=40", "--config.data.capworld.num_validation=4",
         "--config.data.capworld.num_test=4"]
_SMALL = [*_DATA, "--config.vision_pretrain.num_steps=2", "--config.vision_pretrain.batch_size=4",
          "--config.vision_pretrain.optimizer.warmup_steps=1",
          "--config.sft.num_steps=3", "--config.sft.batch_size=4",
          "--config.sft.optimizer.warmup_steps=1", "--config.rl.optimizer.warmup_steps=1",
          "--config.rl.num_steps=2", "--config.rl.batch_size=2", "--config.rl.group_size=4",
          "--config.rl.sample_table_every=2", "--config.sampling.max_new_tokens=8",
          "--config.rl.final_eval_examples=4", "--config.batch_size=4",
          "--config.checkpoint.every_steps=2", "--config.metrics.log_every_steps=1"]


def balcap_main(*args, tmp_path, cwd=REPO, devices=None, env=None):
  env = dict(os.environ, **(env or {}), TFDS_DATA_DIR=str(tmp_path / "tfds"),
             BALCAP_CACHE=str(tmp_path / "cache"))
  if devices:  # as on a user's machine, instead of the test suite's 8 simulated devices
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, "-m", "balcap.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_demo_command_runs_every_stage_on_a_gs_workdir_and_a_second_run_redoes_nothing(
    tmp_path, fake_gcs):
  """The demo as a pod runs it: the workdir in a bucket (the fake GCS server of fake_gcs.py,
  reached through the real gcsfs and tensorstore clients); every output is read back from it."""
  workdir = "gs://balcap-test/demo"
  command = [f"--config={REPO}/configs/tiny.py", *_SMALL, f"--workdir={workdir}"]
  done = balcap_main(*command, tmp_path=tmp_path, cwd=tmp_path, devices=1, env=fake_gcs)
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout
  assert "[1/5] data: capworld/n40-4-4_224x224" in out and "'train': 40" in out
  assert "[2/5] SFT: 3/3 steps on sft_caption captions" in out
  assert "[3/5] evaluation before RL on 4 test examples" in out
  assert "[4/5] RL (c_gdpo, judge capworld): 2/2 steps" in out
  for row in ("precision", "recall", "linguistic", "b_capscore", "length_ratio", "degenerate",
              "b_capscore se"):
    assert row in out.split("[5/5]")[1]
  assert not (tmp_path / "runs").exists()  # nothing went to the default local workdir
  assert json.loads(paths.read_text(f"{workdir}/config.json"))["mode"] == "train"
  summary = json.loads(paths.read_text(f"{workdir}/eval.json"))
  assert 0 <= summary["after"]["degenerate"] <= 1  # CapWorldJudge flags repeats, contradictions
  assert summary["before"]["examples"] == summary["after"]["examples"] == 4
  assert len(summary["after"]["per_image"]["recall"]) == 4  # for the change's standard error
  assert len(summary["examples"]["after"]) == 2
  assert paths.listdir(f"{workdir}/sft/checkpoints") == ["2", "3"]
  assert paths.listdir(f"{workdir}/rl/checkpoints") == ["2"]
  sft_log = metrics.read_jsonl(f"{workdir}/sft/metrics.jsonl")
  assert [r["step"] for r in sft_log] == [1, 2, 3] and all(r["sft/loss"] > 0 for r in sft_log)
  records = metrics.read_jsonl(f"{workdir}/rl/metrics.jsonl")
  rl_log = [r for r in records if "texts" not in r]
  assert [r["step"] for r in rl_log] == [1, 2]
  (table,) = [r for r in records if "texts" in r]  # the sample table of step 2
  assert table["step"] == 2 and "| precision |" in table["texts"]["samples"]
  for key in ("reward/precision/mean", "update/policy/clip_fraction", "update/grad_norm",
              "mismatch/sampler_vs_trainer_logprob_max", "time/sample", "learning_rate"):
    assert key in rl_log[-1], sorted(rl_log[-1])
  assert len(metrics.read_jsonl(f"{workdir}/rl/samples.jsonl")) == 8
  assert paths.listdir(f"{workdir}/rl/tensorboard")  # tensorboardX's own gs:// writer

  # The same command again restores each finished stage from the bucket instead of redoing it.
  again = balcap_main(*command, tmp_path=tmp_path, cwd=tmp_path, devices=1, env=fake_gcs)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "(resumed from step 3)" in again.stdout and "(resumed from step 2)" in again.stdout
  assert json.loads(paths.read_text(f"{workdir}/eval.json"))["after"] == summary["after"]
  assert [r["step"] for r in metrics.read_jsonl(f"{workdir}/sft/metrics.jsonl")] == [1, 2, 3]

  # mode eval reads the trained params from the bucket and writes its report there.
  scored = balcap_main(f"--config={REPO}/configs/eval.py:model=tiny", f"--workdir={workdir}",
                       f"--config.eval.run={workdir}", "--config.eval.benchmarks=('capscore',)",
                       *_DATA, "--config.batch_size=4", "--config.sampling.max_new_tokens=8",
                       tmp_path=tmp_path, cwd=tmp_path, devices=1, env=fake_gcs)
  assert scored.returncode == 0, scored.stderr[-3000:]
  result = json.loads(paths.read_text(f"{workdir}/eval/capscore.json"))
  assert result["captioner"]["run"] == workdir and result["captioner"]["stage"] == "rl"
  assert result["scored"] == 4
  assert "b-CapScore" in paths.read_text(f"{workdir}/eval/report.md")
  assert len(paths.read_text(f"{workdir}/eval/captions.jsonl").splitlines()) == 4


def test_mode_argument_selects_the_mode_and_the_workdir_defaults_to_runs_config(tmp_path):
  done = balcap_main(f"--config={REPO}/configs/tiny.py:mode=data", *_DATA, tmp_path=tmp_path,
                     cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  assert "validation: 4 examples" in done.stdout and "test: 4 examples" in done.stdout
  assert (tmp_path / "runs" / "tiny" / "data_preview.png").exists()


def test_mode_eval_without_its_folders_and_judge_says_which_fields(tmp_path):
  done = balcap_main("--config=configs/tiny.py:mode=eval", tmp_path=tmp_path)
  assert done.returncode == 1
  assert ("config.eval.benchmarks has dcscore but config.eval.decapbench is empty"
          in done.stderr)
  assert "config.eval.judge.base_url and .model name the benchmarks' judge" in done.stderr


def test_config_errors_name_the_field_and_the_fix_before_any_work(tmp_path):
  done = balcap_main("--config=configs/tiny.py", "--config.batch_size=12",
                     "--config.mesh.fsdp=8", "--config.sft.num_steps=10",
                     f"--workdir={tmp_path / 'run'}", tmp_path=tmp_path)
  assert done.returncode == 1
  assert "config.batch_size=12 does not divide over the 8 data shards" in done.stderr
  assert ("config.sft.optimizer: cosine decay ends at step 10, not after warmup_steps=30"
          in done.stderr)
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
