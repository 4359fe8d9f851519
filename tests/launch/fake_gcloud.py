#!/usr/bin/env python3
"""A stand-in for `gcloud` in launcher tests: records each call, answers like gcloud.

It keeps a TPU slice's life in a JSON file ($FAKE_GCLOUD_STATE) between calls and appends
each call's arguments to $FAKE_GCLOUD_LOG (one JSON list per line). Scenario keys in the state:

  vm, queued        the slice / queued resource ({"state": ..., "polls": n}), or absent
  refuse_create     an error text for `create` (e.g. a quota message)
  ssh_failures      {"install": n, "start": n, "scp": n}: that many calls fail, worker 2 down
  follow            what successive log follows do: an exit status, "preempt" (the slice is
                    preempted mid-run, ssh drops) or "drop" (ssh drops, the slice is fine)
"""

import json
import os
import re
import sys

NOT_FOUND = ("ERROR: (gcloud.compute.tpus.{kind}.describe) NOT_FOUND: Resource "
             "'projects/p/locations/z/{what}/{name}' was not found\n")
WORKER_DOWN = ("ERROR: (gcloud.compute.tpus.tpu-vm.ssh) [/usr/bin/ssh] exited with return code "
               "[255].\nworker 2: ssh: connect to host 10.130.0.7 port 22: Connection refused\n")


def main(argv):
  with open(os.environ["FAKE_GCLOUD_LOG"], "a", encoding="utf-8") as f:
    f.write(json.dumps(argv) + "\n")
  path = os.environ["FAKE_GCLOUD_STATE"]
  with open(path, encoding="utf-8") as f:
    state = json.load(f)
  try:
    return answer(argv, state)
  finally:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(state, f)


def _flag(argv, name):
  for a in argv:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return None


def _fail_once(state, key):
  left = state.get("ssh_failures", {}).get(key, 0)
  if left:
    state["ssh_failures"][key] = left - 1
    sys.stderr.write(WORKER_DOWN)
    return True
  return False


def _poll(resource, ready):
  if resource["state"] not in ("CREATING", "WAITING_FOR_RESOURCES", "PROVISIONING"):
    return resource["state"]
  if resource.get("polls", 0) > 0:
    resource["polls"] -= 1
    return resource["state"]
  resource["state"] = ready
  return ready


def _create(state, key, first_state):
  """A slice or queued resource that answers `first_state` to one describe, then is ready."""
  if state.get("refuse_create"):
    sys.stderr.write(state["refuse_create"])
    return 1
  state[key] = {"state": first_state, "polls": 1}
  return 0


def _delete(state, *keys):
  for key in keys:
    state[key] = None
  state["installed"] = []  # a new slice has fresh disks
  return 0


def answer(argv, state):
  assert argv[:2] == ["compute", "tpus"], argv
  kind, verb, name = argv[2], argv[3], argv[4]
  if kind == "queued-resources":
    if verb == "describe":
      if not state.get("queued"):
        sys.stderr.write(NOT_FOUND.format(kind=kind, what="queuedResources", name=name))
        return 1
      print(_poll(state["queued"], "ACTIVE"))
      if state["queued"]["state"] == "ACTIVE":
        state["vm"] = state.get("vm") or {"state": "READY"}
      return 0
    if verb == "create":
      return _create(state, "queued", "WAITING_FOR_RESOURCES")
    if verb == "delete":
      return _delete(state, "queued", "vm")
  if kind == "tpu-vm":
    vm = state.get("vm")
    if verb == "describe":
      if not vm:
        sys.stderr.write(NOT_FOUND.format(kind=kind, what="nodes", name=name))
        return 1
      print(_poll(vm, "READY"))
      return 0
    if verb == "create":
      return _create(state, "vm", "CREATING")
    if verb == "delete":
      return _delete(state, "vm")
    if not vm or vm["state"] != "READY":
      sys.stderr.write(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) node {name} is not ready\n")
      return 1
    if verb == "scp":
      return 1 if _fail_once(state, "scp") else 0
    if verb == "ssh":
      command = _flag(argv, "command")
      if command.startswith("test -f "):
        digest = command.rsplit("installed-", 1)[1]
        return 0 if digest in state.get("installed", []) else 1
      if "pip install" in command:
        if _fail_once(state, "install"):
          return 1
        state.setdefault("installed", []).append(re.search(r"installed-(\w+)", command)[1])
        return 0
      if "nohup" in command:
        if _fail_once(state, "start"):
          return 1
        state.setdefault("started", []).append(command)
        return 0
      if command.startswith("tail "):
        assert _flag(argv, "worker") == "0", argv
        outcome = state["follow"].pop(0)
        print("[1/5] data: capworld", flush=True)
        if outcome == "preempt":
          vm["state"] = "PREEMPTED"
          return 255
        if outcome == "drop":
          return 255
        print(f"done (exit {outcome})")
        return outcome
  sys.stderr.write(f"fake gcloud: unexpected call {argv}\n")
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
