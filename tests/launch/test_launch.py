"""`python -m balcap.launch` against a fake `gcloud` on PATH (fake_gcloud.py).

The fake keeps a slice's state between calls and records every call, so each test asserts
the exact gcloud commands of a launch, and what happens when creation is refused, ssh fails on
a worker, or the slice is preempted mid-run.
"""

import json
import os
import subprocess
import sys

import pytest

from balcap.launch import slices, source
from testlib import REPO

HERE = os.path.dirname(os.path.abspath(__file__))
BALCAP = ["--config=configs/qwen7b.py:hardware=tpu", "--workdir=gs://bucket/runs/qwen7b"]
QUOTA = ("ERROR: (gcloud.compute.tpus.tpu-vm.create) {\"code\": 429, \"message\": \"Quota "
         "limit 'TPUV5sLitepodPerProjectPerZone' has been exceeded. Limit: 32 in zone "
         "us-west4-a.\", \"status\": \"RESOURCE_EXHAUSTED\"}\n")


class FakeGcloud:
  def __init__(self, tmp_path, **scenario):
    self.bin = tmp_path / "bin"
    self.bin.mkdir()
    (self.bin / "gcloud").symlink_to(os.path.join(HERE, "fake_gcloud.py"))
    self.state_path, self.log_path = tmp_path / "state.json", tmp_path / "calls.jsonl"
    self.state_path.write_text(json.dumps({"follow": [0], **scenario}))
    self.log_path.write_text("")

  def launch(self, *flags, command=BALCAP, accelerator="v4-32"):
    args = [sys.executable, "-m", "balcap.launch", "--name=balcap-test", "--zone=us-west4-a",
            "--project=my-project", "--poll_s=0", f"--accelerator={accelerator}", *flags]
    if command:
      args += ["--", *command]
    env = dict(os.environ, PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
               FAKE_GCLOUD_STATE=str(self.state_path), FAKE_GCLOUD_LOG=str(self.log_path))
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

  def calls(self) -> list[list[str]]:
    return [json.loads(line) for line in self.log_path.read_text().splitlines()]

  def steps(self) -> list[str]:
    """Each call as `<resource> <verb>`, ssh calls by what they do."""
    named = []
    for call in self.calls():
      step = f"{call[2]} {call[3]}"
      if call[3] == "ssh":
        command = next(a for a in call if a.startswith("--command="))
        step += (" check" if "test -f" in command else " install" if "pip install" in command
                 else " start" if "nohup" in command else " follow")
      named.append(step)
    return named

  @property
  def state(self) -> dict:
    return json.loads(self.state_path.read_text())


_DIGEST = None


def _digest():
  global _DIGEST  # pylint: disable=global-statement
  if _DIGEST is None:
    _DIGEST = source.pack(str(REPO))[1]
  return _DIGEST


FRESH = ["tpu-vm describe", "tpu-vm create", "tpu-vm describe", "tpu-vm describe",
         "tpu-vm ssh check", "tpu-vm scp", "tpu-vm ssh install", "tpu-vm ssh start",
         "tpu-vm ssh follow"]


def test_a_fresh_launch_creates_installs_runs_on_all_workers_follows_host0_and_deletes(tmp_path):
  fake = FakeGcloud(tmp_path)
  done = fake.launch("--delete_after")
  assert done.returncode == 0, done.stderr
  assert fake.steps() == FRESH + ["tpu-vm delete"]
  calls = fake.calls()
  where = ["--zone=us-west4-a", "--project=my-project"]
  assert calls[1] == ["compute", "tpus", "tpu-vm", "create", "balcap-test", *where,
                      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
  install, start, follow = calls[6], calls[7], calls[8]
  assert "--worker=all" in install and "--worker=all" in start and "--worker=0" in follow
  assert calls[5][4:6] == [f"/tmp/balcap-{_digest()}.tar.gz",
                           f"balcap-test:balcap-{_digest()}.tar.gz"]
  assert f"touch ~/.balcap/installed-{_digest()}" in install[-2]
  # The same balcap command on every host, from the installed checkout.
  assert ("cd ~/balcap && nohup bash -c 'python3 -m balcap.main "
          "--config=configs/qwen7b.py:hardware=tpu --workdir=gs://bucket/runs/qwen7b;" in start[-2])
  assert "[1/5] data: capworld" in done.stdout  # host 0's log, streamed
  assert fake.state["vm"] is None


def test_a_second_launch_reuses_the_slice_and_the_installed_code(tmp_path):
  fake = FakeGcloud(tmp_path, follow=[0, 0])
  assert fake.launch().returncode == 0
  first = len(fake.calls())
  again = fake.launch()
  assert again.returncode == 0, again.stderr
  assert fake.steps()[first:] == ["tpu-vm describe", "tpu-vm ssh check", "tpu-vm ssh start",
                                  "tpu-vm ssh follow"]
  assert "reusing balcap-test (READY)" in again.stdout
  assert "installed on every worker already" in again.stdout


def test_quota_refusal_stops_with_what_to_do_and_runs_nothing_on_workers(tmp_path):
  fake = FakeGcloud(tmp_path, refuse_create=QUOTA, follow=[])
  done = fake.launch(accelerator="v5e-64")
  assert done.returncode == 1
  assert "refused for quota or capacity" in done.stderr and "--queued" in done.stderr
  assert "Limit: 32" in done.stderr
  assert fake.steps() == ["tpu-vm describe", "tpu-vm create"]


def test_ssh_failing_on_one_worker_is_retried_then_reported_and_a_rerun_goes_on(tmp_path):
  fake = FakeGcloud(tmp_path, ssh_failures={"install": 1})
  done = fake.launch()
  assert done.returncode == 0, done.stderr
  assert fake.steps().count("tpu-vm ssh install") == 2
  assert "installing balcap on the workers failed (try 1/3)" in done.stdout
  assert "worker 2: ssh: connect to host" in done.stdout

  (tmp_path / "b").mkdir()
  broken = FakeGcloud(tmp_path / "b", ssh_failures={"start": 3}, follow=[0])
  failed = broken.launch()
  assert failed.returncode == 1
  assert "starting the run on the workers failed 3 times" in failed.stderr
  assert "worker 2" in failed.stderr and "run the same command again" in failed.stderr
  assert broken.state["vm"]["state"] == "READY"  # kept for the rerun
  calls = len(broken.calls())
  rerun = broken.launch()
  assert rerun.returncode == 0, rerun.stderr
  assert broken.steps()[calls:] == ["tpu-vm describe", "tpu-vm ssh check", "tpu-vm ssh start",
                                    "tpu-vm ssh follow"]


def test_a_preempted_slice_is_recreated_and_the_run_resumed(tmp_path):
  fake = FakeGcloud(tmp_path, spot=True, follow=["preempt", 0])
  done = fake.launch("--spot")
  assert done.returncode == 0, done.stderr
  assert fake.steps() == FRESH + ["tpu-vm describe", "tpu-vm delete", "tpu-vm create",
                                  "tpu-vm describe", "tpu-vm describe", "tpu-vm ssh check",
                                  "tpu-vm scp", "tpu-vm ssh install", "tpu-vm ssh start",
                                  "tpu-vm ssh follow"]
  assert all("--spot" in c for c in fake.calls() if c[3] == "create")
  assert "PREEMPTED (preempted): recreating it and resuming (1/3)" in done.stdout
  starts = [c for c in fake.calls() if "nohup" in " ".join(c)]
  assert starts[0] == starts[1]  # the same command: balcap resumes from the gs:// workdir


def test_a_dropped_log_connection_reattaches_and_a_failed_run_keeps_the_slice(tmp_path):
  fake = FakeGcloud(tmp_path, follow=["drop", 1])
  done = fake.launch("--delete_after")
  assert done.returncode == 1
  # Dropped: the slice is READY, so re-attach; then the run's own failure.
  assert fake.steps()[-4:] == ["tpu-vm ssh follow", "tpu-vm describe", "tpu-vm ssh follow",
                               "tpu-vm describe"]
  assert "re-attaching" in done.stdout
  assert "exit status 1 on host 0" in done.stderr and "The slice is kept" in done.stderr
  assert fake.state["vm"]["state"] == "READY"


def test_queued_spot_slice_waits_for_capacity(tmp_path):
  fake = FakeGcloud(tmp_path)
  done = fake.launch("--queued", "--spot", accelerator="v5e-64")
  assert done.returncode == 0, done.stderr
  steps = fake.steps()
  assert steps[:4] == ["queued-resources describe", "queued-resources create",
                       "queued-resources describe", "queued-resources describe"]
  assert fake.calls()[1] == [
      "compute", "tpus", "queued-resources", "create", "balcap-test", "--node-id=balcap-test",
      "--zone=us-west4-a", "--project=my-project", "--accelerator-type=v5litepod-64",
      "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
  assert "balcap-test is WAITING_FOR_RESOURCES; waiting" in done.stdout


@pytest.mark.parametrize("accelerator,created,hosts", [
    ("v5e-64", "--accelerator-type=v5litepod-64 --version=v2-alpha-tpuv5-lite", "64 chips on 16 hosts"),
    ("v4-32", "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base", "16 chips on 4 hosts")])
def test_dry_run_prints_the_whole_sequence_and_runs_nothing(tmp_path, accelerator, created, hosts):
  fake = FakeGcloud(tmp_path)
  done = fake.launch("--dry_run", "--delete_after", accelerator=accelerator)
  assert done.returncode == 0, done.stderr
  assert fake.calls() == []
  commands = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
  kinds = [" ".join(c.split()[3:5]) for c in commands]
  assert kinds == ["tpu-vm describe", "tpu-vm create", "tpu-vm describe", "tpu-vm ssh",
                   "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm delete"]
  assert created in commands[1] and hosts in done.stdout
  assert all("--zone=us-west4-a --project=my-project" in c for c in commands)
  assert "python3 -m balcap.main --config=configs/qwen7b.py:hardware=tpu" in commands[6]
  assert "--worker=all" in commands[6] and "--worker=0" in commands[7]


def test_bad_launches_are_refused_before_any_call(tmp_path):
  fake = FakeGcloud(tmp_path)
  local = fake.launch(command=["--config=configs/tiny.py", "--workdir=runs/x"])
  assert local.returncode == 2 and "--workdir=gs://" in local.stderr
  unknown = fake.launch(accelerator="v9-8")
  assert unknown.returncode == 1 and "v5e-64" in unknown.stderr
  assert fake.calls() == []


def test_delete_only(tmp_path):
  fake = FakeGcloud(tmp_path, vm={"state": "READY"})
  done = fake.launch("--delete", command=None)
  assert done.returncode == 0, done.stderr
  assert fake.steps() == ["tpu-vm delete"] and fake.state["vm"] is None


@pytest.mark.parametrize("name,gcloud_type,chips,hosts", [
    ("v5e-64", "v5litepod-64", 64, 16), ("v5litepod-8", "v5litepod-8", 8, 1),
    ("v4-32", "v4-32", 16, 4), ("v4-8", "v4-8", 4, 1), ("v5p-128", "v5p-128", 64, 16),
    ("v6e-16", "v6e-16", 16, 4)])
def test_slice_names(name, gcloud_type, chips, hosts):
  s = slices.parse(name)
  assert (s.accelerator_type, s.chips, s.hosts) == (gcloud_type, chips, hosts)


def test_bad_slice_names_say_what_is_expected():
  for name, message in (("v5e", "such as v5e-64"), ("v4-33", "must be even"),
                        ("v5e-18", "whole hosts")):
    with pytest.raises(ValueError, match=message):
      slices.parse(name)


def test_the_packed_code_is_deterministic_and_holds_the_tracked_files():
  data, digest = source.pack(str(REPO))
  assert source.pack(str(REPO)) == (data, digest)
  import io, tarfile  # pylint: disable=import-outside-toplevel,multiple-statements
  names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
  assert "setup.py" in names and "balcap/launch/__main__.py" in names
  assert not any(n.startswith(".ci/venv") for n in names)
