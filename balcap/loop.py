"""The step loop every training mode shares: resume, checkpoints, preemption, metrics, progress.

A mode supplies a state pytree (freshly initialised and placed on the current mesh), a data
iterator and a pure-ish `step_fn(state, batch, step) -> (state, metrics)` (a `"_texts"` entry
in the metrics, {name: text}, is written as text every time it appears). The loop:
- resumes from the latest complete checkpoint in `workdir/checkpoints` when there is one
  (state restored onto the CURRENT mesh, data iterator restored to the next unseen batch);
- checkpoints every `config.checkpoint.every_steps`, at the last step, and when preempted
  (SIGTERM: save at the end of the current step, then return), asynchronously;
- writes `step_fn`'s metrics and its own timings every `config.metrics.log_every_steps`;
- shows a progress bar with rate and ETA on process 0.
A run killed outright (SIGKILL, power loss) loses only the steps since its last complete
checkpoint, and repeats them exactly when resumed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils

from balcap import checkpoint, metrics

log = logging.getLogger(__name__)

StepFn = Callable[[Any, Any, int], tuple[Any, dict[str, Any]]]


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int                 # steps completed, over all runs of this workdir
  resumed_from: int | None  # checkpoint step this run started from, if any
  preempted: bool           # stopped early by SIGTERM (a checkpoint of `step` exists)
  seconds: float            # wall time of this run's loop


def abstract_like(state: Any) -> Any:
  """Shapes, dtypes and CURRENT shardings of `state`: the target a checkpoint restores into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      state)


def _check_same_keys(checkpointer: checkpoint.Checkpointer, step: int, state: Any) -> None:
  """A checkpoint restores only into a state of its own parts (orbax's own error lists every
  leaf); say which parts differ and what usually causes it."""
  saved, wanted = set(checkpointer.saved_keys(step)), set(state)
  if saved != wanted:
    raise ValueError(
        f"checkpoint {step} in {checkpointer.directory} holds the state parts {sorted(saved)}, "
        f"this run's state has {sorted(wanted)} (only in the checkpoint: "
        f"{sorted(saved - wanted)}; only in this run: {sorted(wanted - saved)}). The run was "
        "written with different settings (e.g. config.rl.async_rewards adds 'inflight'): "
        "resume with the settings it was written with, or start in a new workdir")


class PreemptionGuard:
  """Turns SIGTERM into 'save and stop at the end of this step', agreed by every host.

  One process: a SIGTERM handler sets a flag. Several: JAX's preemption notifier (started by
  jax.distributed) tells all hosts the same step to stop at.
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def _on_sigterm(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
    self._signalled.set()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def run(*, workdir: str, config, state: Any, data_iterator: Any, step_fn: StepFn,
        description: str = "train") -> LoopResult:
  """Runs steps until `config.num_steps` (counting steps of earlier runs) or preemption."""
  started = time.time()
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
  resumed_from = checkpointer.latest_step()
  if resumed_from is not None:
    _check_same_keys(checkpointer, resumed_from, state)
    state = checkpointer.restore(abstract_like(state), data_iterator=data_iterator)
    log.info("%s: resumed from checkpoint %d", description, resumed_from)
  step = resumed_from or 0
  writer = metrics.create_writer(workdir, tensorboard=config.metrics.tensorboard,
                                 jsonl=config.metrics.jsonl)
  bar = metrics.ProgressBar(config.num_steps, initial=step, description=description,
                            enabled=config.metrics.progress_bar)
  preempted = False
  last_log_time, last_log_step = time.time(), step
  try:
    with PreemptionGuard() as guard:
      while step < config.num_steps:
        data_start = time.time()
        batch = next(data_iterator)
        step_start = time.time()
        state, step_metrics = step_fn(state, batch, step + 1)
        step += 1
        bar.update(1)
        texts = step_metrics.pop("_texts", None)  # tables of samples, written every time
        if texts:
          writer.write_texts(step, texts)
        if step % config.metrics.log_every_steps == 0 or step == config.num_steps:
          now = time.time()
          writer.write_scalars(step, {
              **step_metrics,
              "loop/steps_per_second": (step - last_log_step) / max(now - last_log_time, 1e-9),
              "loop/data_seconds": step_start - data_start,
              "loop/step_seconds": now - step_start,
          })
          last_log_time, last_log_step = now, step
        preempted = guard.should_stop(step)
        if preempted or step % config.checkpoint.every_steps == 0 or step == config.num_steps:
          checkpointer.save(step, state, data_iterator=data_iterator, config=config)
        if preempted:
          bar.write(f"{description}: preempted; checkpoint {step} saved, stopping")
          break
  finally:
    checkpointer.close()  # waits for the last asynchronous save
    writer.close()
    bar.close()
  return LoopResult(state=state, step=step, resumed_from=resumed_from, preempted=preempted,
                    seconds=time.time() - started)
