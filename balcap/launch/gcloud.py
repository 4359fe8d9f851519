"""The gcloud commands of a TPU VM launch, and one place that runs them (or only prints them).

Every command is a list of arguments, built here and nowhere else, so a dry run prints exactly
what a real run would execute, and the tests (a fake `gcloud` on PATH) assert that sequence.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
import time
from typing import Sequence

# Substrings of gcloud's error output that mean "no capacity / no quota": retrying the same
# request does not help; a queued resource, another zone or a smaller slice does.
_NO_CAPACITY = ("quota", "resource_exhausted", "no more capacity", "insufficient capacity",
                "stockout")
# Substrings that mean the slice does not exist.
_NOT_FOUND = ("not_found", "not found", "was not found")


class LaunchError(RuntimeError):
  """A step of the launch failed; the message says which, and what to do."""


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str
  stderr: str

  def lower_err(self) -> str:
    return (self.stderr + self.stdout).lower()

  @property
  def no_capacity(self) -> bool:
    return any(s in self.lower_err() for s in _NO_CAPACITY)

  @property
  def not_found(self) -> bool:
    return any(s in self.lower_err() for s in _NOT_FOUND)


@dataclasses.dataclass
class Gcloud:
  """Builds and runs the commands for one slice (`name`) in one zone and project."""
  name: str
  zone: str
  project: str
  dry_run: bool = False
  binary: str = "gcloud"
  log: object = sys.stdout

  def _where(self) -> list[str]:
    return [f"--zone={self.zone}", f"--project={self.project}"]

  # --- the commands ----------------------------------------------------------------------

  def describe_vm(self) -> list[str]:
    return [self.binary, "compute", "tpus", "tpu-vm", "describe", self.name, *self._where(),
            "--format=value(state)"]

  def create_vm(self, accelerator_type: str, runtime_version: str, spot: bool) -> list[str]:
    return [self.binary, "compute", "tpus", "tpu-vm", "create", self.name, *self._where(),
            f"--accelerator-type={accelerator_type}", f"--version={runtime_version}",
            *(["--spot"] if spot else [])]

  def delete_vm(self) -> list[str]:
    return [self.binary, "compute", "tpus", "tpu-vm", "delete", self.name, *self._where(),
            "--quiet"]

  def describe_queued(self) -> list[str]:
    return [self.binary, "compute", "tpus", "queued-resources", "describe", self.name,
            *self._where(), "--format=value(state.state)"]

  def create_queued(self, accelerator_type: str, runtime_version: str, spot: bool) -> list[str]:
    return [self.binary, "compute", "tpus", "queued-resources", "create", self.name,
            f"--node-id={self.name}", *self._where(), f"--accelerator-type={accelerator_type}",
            f"--runtime-version={runtime_version}", *(["--spot"] if spot else [])]

  def delete_queued(self) -> list[str]:
    # --force deletes the node the queued resource made, too.
    return [self.binary, "compute", "tpus", "queued-resources", "delete", self.name,
            *self._where(), "--force", "--quiet"]

  def scp(self, local: str, remote: str) -> list[str]:
    return [self.binary, "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}",
            *self._where(), "--worker=all", "--quiet"]

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    # --quiet: no prompt (e.g. to make an ssh key) in a launch nobody is watching.
    return [self.binary, "compute", "tpus", "tpu-vm", "ssh", self.name, *self._where(),
            f"--worker={worker}", f"--command={command}", "--quiet"]

  # --- running them ----------------------------------------------------------------------

  def say(self, text: str) -> None:
    print(text, file=self.log, flush=True)

  def run(self, args: Sequence[str], *, stream: bool = False,
          dry_answer: str = "") -> Result:
    """Runs one command (prints it first). `stream`: its output goes straight to ours (a log
    being followed) instead of being captured. A dry run only prints, and answers
    `dry_answer` as the command's output."""
    self.say("+ " + shlex.join(args))
    if self.dry_run:
      return Result(0, dry_answer, "")
    try:
      if stream:  # inherits our stdout and stderr
        done = subprocess.run(list(args), check=False)
        return Result(done.returncode, "", "")
      done = subprocess.run(list(args), check=False, capture_output=True, text=True)
    except FileNotFoundError as e:
      raise LaunchError(f"{args[0]} is not installed or not on PATH: install the Google Cloud "
                        "SDK (https://cloud.google.com/sdk/docs/install) and run "
                        "`gcloud auth login`") from e
    return Result(done.returncode, done.stdout, done.stderr)

  def run_retried(self, args: Sequence[str], what: str, *, tries: int, wait_s: float) -> Result:
    """Runs a command that may fail for passing reasons (ssh to a worker still booting),
    `tries` times; raises LaunchError with its output when every try failed."""
    for attempt in range(1, tries + 1):
      result = self.run(args)
      if result.returncode == 0:
        if result.stdout.strip():
          self.say(result.stdout.rstrip())
        return result
      self.say(f"{what} failed (try {attempt}/{tries}): {tail_of(result)}")
      if attempt < tries:
        time.sleep(wait_s)
    raise LaunchError(f"{what} failed {tries} times; last output:\n{tail_of(result, 2000)}\n"
                      "The slice is kept: run the same command again to continue from here.")


def tail_of(result: Result, chars: int = 400) -> str:
  """The end of a failed command's error output (or its exit status), for a message."""
  text = (result.stderr or result.stdout).strip()
  return text[-chars:] if text else f"exit status {result.returncode}"
