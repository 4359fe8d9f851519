"""`python -m balcap.launch`: one balcap command on every host of a TPU VM pod slice.

    python -m balcap.launch --name=balcap-v5e --accelerator=v5e-64 --zone=us-west4-a \
        --project=my-project [--spot] [--queued] [--delete_after] [--dry_run] -- \
        --config=configs/qwen7b.py:hardware=tpu --workdir=gs://my-bucket/runs/qwen7b

1. the slice: reused when it exists and is READY, created otherwise (a queued resource with
   `--queued`, which waits for capacity instead of failing on it), recreated when preempted;
2. balcap installed on every worker from this checkout (skipped where that exact code is
   installed already);
3. the balcap command (everything after `--`) started on every worker (`--worker=all`),
   detached, so a dropped ssh connection does not stop it;
4. host 0's log followed until the run ends; a preempted slice is recreated and the run
   resumed from its gs:// checkpoints, up to `--max_restarts` times;
5. `--delete_after`: the slice deleted when the run succeeded (or `--delete` alone, any time).

Every step can be re-run: the same command after a failure picks up where it stopped (an
existing slice, an installed worker and a running job are all found and reused). `--dry_run`
prints every gcloud command the launch would run, and runs none.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
import tempfile
import time

from balcap.launch import gcloud as gcloud_lib
from balcap.launch import slices, source

LaunchError = gcloud_lib.LaunchError
_READY = {"READY", "ACTIVE"}
# Any other state (CREATING, WAITING_FOR_RESOURCES, PROVISIONING, REPAIRING, ...) is waited on.
_LOST = {"PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED", "STOPPED", "SUSPENDING"}
# The tail command's exit status when the job left no exit status (killed, host rebooted).
_NO_STATUS = 250
_SSH_FAILED = 255  # gcloud ssh's own failure, not the command's


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(launcher flags, the balcap command's arguments after `--`)."""
  if "--" in argv:
    at = argv.index("--")
    argv, command = argv[:at], argv[at + 1:]
  else:
    command = []
  p = argparse.ArgumentParser(prog="python -m balcap.launch", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="the TPU VM (and queued resource) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", required=True)
  p.add_argument("--accelerator", help="slice, e.g. v5e-64, v4-32, v5p-128, v6e-16")
  p.add_argument("--runtime_version", help="TPU VM image (default: the generation's)")
  p.add_argument("--spot", action="store_true", help="a spot slice (cheaper, preemptible)")
  p.add_argument("--queued", action="store_true",
                 help="create through a queued resource: waits for capacity")
  p.add_argument("--source", default=_default_source(),
                 help="the balcap checkout to install (default: this one)")
  p.add_argument("--delete_after", action="store_true", help="delete the slice on success")
  p.add_argument("--delete", action="store_true", help="only delete the slice")
  p.add_argument("--max_restarts", type=int, default=3,
                 help="times a preempted slice is recreated and the run resumed")
  p.add_argument("--ssh_tries", type=int, default=3, help="tries of each ssh step")
  p.add_argument("--poll_s", type=float, default=30.0, help="seconds between state checks")
  p.add_argument("--ready_timeout_s", type=float, default=4 * 3600.0,
                 help="how long to wait for the slice to be ready")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run none")
  p.add_argument("--gcloud", default="gcloud", help="the gcloud binary")
  args = p.parse_args(argv)
  if not args.delete:
    problems = []
    if not args.accelerator:
      problems.append("--accelerator is required to launch (e.g. --accelerator=v5e-64)")
    if not command:
      problems.append("no balcap command: give its arguments after `--`, e.g. `-- "
                      "--config=configs/qwen7b.py:hardware=tpu --workdir=gs://bucket/run`")
    elif not any(a.startswith("--workdir=gs://") for a in command):
      problems.append("the balcap command needs --workdir=gs://...: the hosts of a pod share "
                      "no disk, and a recreated slice resumes from the bucket")
    if problems:
      p.error("; ".join(problems))
  return args, command


def _default_source() -> str:
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Launch:
  """The steps of one launch, over one Gcloud (real or dry)."""

  def __init__(self, args: argparse.Namespace, command: list[str]):
    self.args, self.command = args, command
    self.gcloud = gcloud_lib.Gcloud(args.name, args.zone, args.project, dry_run=args.dry_run,
                                    binary=args.gcloud)
    self.slice = slices.parse(args.accelerator) if args.accelerator else None

  def say(self, text: str) -> None:
    self.gcloud.say(f"[launch] {text}")

  # --- 1. the slice -------------------------------------------------------------------------

  def state(self) -> str | None:
    """The slice's state (the queued resource's with --queued), None when there is none."""
    describe = self.gcloud.describe_queued() if self.args.queued else self.gcloud.describe_vm()
    result = self.gcloud.run(describe)
    if result.returncode != 0:
      if result.not_found or self.args.dry_run:
        return None
      raise LaunchError(f"cannot read the state of {self.args.name}: "
                        f"{gcloud_lib.tail_of(result)}")
    return result.stdout.strip().upper() or None

  def ensure_slice(self, known: str | None = None) -> None:
    """A READY slice: reused, waited for, created, or (when lost) recreated. `known`: its
    state when the caller just read it."""
    state = known or self.state()
    if state in _LOST:
      self.say(f"{self.args.name} is {state}: deleting it to create it again")
      self.delete()
      state = None
    if state is None:
      self.create()
    elif state in _READY:
      self.say(f"reusing {self.args.name} ({state})")
      return
    self.wait_ready()

  def create(self) -> None:
    s = self.slice
    runtime = self.args.runtime_version or s.runtime_version
    self.say(f"creating {self.args.name}: {s.describe()}, runtime {runtime}"
             f"{', spot' if self.args.spot else ''}{', queued' if self.args.queued else ''}")
    build = self.gcloud.create_queued if self.args.queued else self.gcloud.create_vm
    result = self.gcloud.run(build(s.accelerator_type, runtime, self.args.spot))
    if result.returncode == 0:
      return
    if result.no_capacity:
      raise LaunchError(
          f"creating {s.accelerator_type} in {self.args.zone} was refused for quota or "
          f"capacity: {gcloud_lib.tail_of(result)}\n"
          "Try --queued (waits for capacity), another --zone, a smaller --accelerator, or "
          "ask for quota (console: IAM & Admin > Quotas).")
    raise LaunchError(f"creating {self.args.name} failed: "
                      f"{gcloud_lib.tail_of(result, 2000)}")

  def wait_ready(self) -> None:
    deadline = time.time() + self.args.ready_timeout_s
    while True:
      state = self.state()
      if self.args.dry_run:  # (a dry describe answers nothing: show one poll)
        state = "ACTIVE" if self.args.queued else "READY"
      if state in _READY:
        self.say(f"{self.args.name} is {state}")
        return
      if state in _LOST or state is None:
        raise LaunchError(f"{self.args.name} became {state or 'absent'} while starting; run "
                          "the same command again to create it anew")
      if time.time() > deadline:
        raise LaunchError(f"{self.args.name} is still {state} after "
                          f"{self.args.ready_timeout_s:.0f}s; run the same command again to "
                          "keep waiting, or --delete it")
      self.say(f"{self.args.name} is {state}; waiting")
      time.sleep(self.args.poll_s)

  def delete(self) -> None:
    command = self.gcloud.delete_queued() if self.args.queued else self.gcloud.delete_vm()
    result = self.gcloud.run(command)
    if result.returncode != 0 and not result.not_found:
      raise LaunchError(f"deleting {self.args.name} failed: "
                        f"{gcloud_lib.tail_of(result)}")

  # --- 2. install ---------------------------------------------------------------------------

  def install(self) -> str:
    """Installs this checkout on every worker unless that code is there; returns its digest."""
    data, digest = source.pack(self.args.source)
    marker = f"~/.balcap/installed-{digest}"
    check = self.gcloud.run(self.gcloud.ssh(f"test -f {marker}"), dry_answer="")
    if check.returncode == 0 and not self.args.dry_run:
      self.say(f"balcap {digest} is installed on every worker already")
      return digest
    tarball = os.path.join(tempfile.gettempdir(), f"balcap-{digest}.tar.gz")
    if not self.args.dry_run:
      with open(tarball, "wb") as f:
        f.write(data)
    self.say(f"installing balcap {digest} ({len(data) / 1e6:.1f} MB) on every worker")
    tries, wait = self.args.ssh_tries, self.args.poll_s
    self.gcloud.run_retried(self.gcloud.scp(tarball, f"balcap-{digest}.tar.gz"),
                            "copying balcap to the workers", tries=tries, wait_s=wait)
    script = (f"set -e; rm -rf ~/balcap && mkdir -p ~/balcap ~/.balcap && "
              f"tar -xzf ~/balcap-{digest}.tar.gz -C ~/balcap && "
              f"python3 -m pip install -q -e \"$HOME/balcap[tpu]\" && touch {marker}")
    self.gcloud.run_retried(self.gcloud.ssh(script), "installing balcap on the workers",
                            tries=tries, wait_s=wait)
    return digest

  # --- 3./4. run and follow -----------------------------------------------------------------

  def job_dir(self, digest: str) -> str:
    key = hashlib.sha256((digest + "\0" + "\0".join(self.command)).encode()).hexdigest()[:10]
    return f"~/.balcap/runs/{key}"

  def start(self, job: str) -> None:
    """Starts the command on every worker unless it is running there already (a rerun of the
    launch attaches to it)."""
    balcap = "python3 -m balcap.main " + shlex.join(self.command)
    body = shlex.quote(f"{balcap}; echo $? > {job}/rc")
    script = (f"mkdir -p {job}; if [ -f {job}/pid ] && kill -0 $(cat {job}/pid) 2>/dev/null; "
              f"then echo running already; else rm -f {job}/rc; cd ~/balcap && "
              f"nohup bash -c {body} > {job}/log 2>&1 < /dev/null & echo $! > {job}/pid; fi")
    self.say(f"starting on every worker: {balcap}")
    self.gcloud.run_retried(self.gcloud.ssh(script), "starting the run on the workers",
                            tries=self.args.ssh_tries, wait_s=self.args.poll_s)

  def follow(self, job: str) -> tuple[int, str | None]:
    """Streams host 0's log until the run ends: (its exit status, _NO_STATUS when it left
    none; the slice's state, when the run ended otherwise). A dropped connection to a slice
    that is still READY re-attaches, up to ssh_tries times."""
    script = (f"tail --pid=$(cat {job}/pid) -n +1 -f {job}/log; "
              f"exit $(cat {job}/rc 2>/dev/null || echo {_NO_STATUS})")
    for _ in range(self.args.ssh_tries):
      self.say(f"following host 0's log ({job}/log on each worker)")
      status = self.gcloud.run(self.gcloud.ssh(script, worker="0"), stream=True).returncode
      if status == 0:
        return 0, None
      state = "READY" if self.args.dry_run else self.state()
      if status != _SSH_FAILED or state not in _READY:
        return status, state
      self.say("lost the connection to host 0; the run goes on, re-attaching")
      time.sleep(self.args.poll_s)
    return _SSH_FAILED, "READY"

  def run(self) -> int:
    if self.args.delete:
      self.delete()
      self.say(f"deleted {self.args.name}")
      return 0
    self.say(f"{self.slice.describe()} as {self.args.name} in {self.args.zone}")
    state = None
    for restart in range(self.args.max_restarts + 1):
      self.ensure_slice(state)
      job = self.job_dir(self.install())
      self.start(job)
      status, state = self.follow(job)
      if status == 0:
        self.say("the run finished")
        if self.args.delete_after:
          self.delete()
          self.say(f"deleted {self.args.name}")
        return 0
      if state in _READY:
        raise LaunchError(
            f"the run ended with exit status {status} on host 0 (log above; every worker keeps "
            f"its own in {job}/log). The slice is kept: fix and run the same command again, "
            "and balcap resumes from the workdir's checkpoints.")
      if restart < self.args.max_restarts:
        self.say(f"{self.args.name} is {state or 'gone'} (preempted): recreating it and "
                 f"resuming ({restart + 1}/{self.args.max_restarts})")
    raise LaunchError(f"{self.args.name} was preempted {self.args.max_restarts + 1} times; run "
                      "the same command again to keep going")


def main(argv: list[str] | None = None) -> int:
  args, command = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    return Launch(args, command).run()
  except (LaunchError, ValueError) as e:
    print(f"[launch] error: {e}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
  sys.exit(main())
