"""Entry point: `python -m balcap.main --config=configs/tiny.py[:key=val,...] [--workdir=...]`.

Flags pick the config (an ml_collections config file with optional `file.py:key=val`
arguments and `--config.a.b=value` overrides) and the work directory; `config.mode` picks what
runs. The config is validated against this machine before anything is compiled. On a TPU pod
every host runs the same command.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from balcap import configs, parallel, paths

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py or configs/tiny.py:mode=data.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and outputs go (local path or gs://). "
    "Default: runs/<config file name>. Re-running with the same workdir resumes.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside TPU "
    "pods and SLURM/MPI (where it is found automatically). Also JAX_COORDINATOR_ADDRESS.")
_IMAGES = flags.DEFINE_string(
    "images", None, "mode caption: comma-separated image paths (default: config.caption.split "
    "of the configured data set).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the run.")


def _run_train(config, workdir):
  from balcap import train  # pylint: disable=import-outside-toplevel
  train.run(config, workdir)


def _run_sft(config, workdir):
  from balcap import sft, train  # pylint: disable=import-outside-toplevel
  if config.sft.num_steps <= 0:
    raise configs.BalcapError("mode sft runs config.sft.num_steps steps; it is 0")
  result = sft.run(config, os.path.join(workdir, "sft"))
  resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
  train.report(f"SFT: {result.step}/{config.sft.num_steps} steps on {config.sft.target} "
               f"captions in {result.seconds:.0f}s{resumed}; checkpoints in "
               f"{workdir}/sft/checkpoints")


def _run_caption(config, workdir):
  from balcap import caption  # pylint: disable=import-outside-toplevel
  images = [p for p in (_IMAGES.value or "").split(",") if p]
  caption.run(config, workdir, images)


def _run_data(config, workdir):
  from balcap.data import report  # pylint: disable=import-outside-toplevel
  report.run(config, workdir)


def _run_compile(config, workdir):
  from balcap.aot import report  # pylint: disable=import-outside-toplevel
  report.run(config, workdir)


def _run_eval(config, workdir):
  from balcap.evals import run  # pylint: disable=import-outside-toplevel
  run.run(config, workdir)


def _run_export(config, workdir):
  from balcap import export  # pylint: disable=import-outside-toplevel
  export.run(config, workdir)


MODE_RUNNERS = {"sft": _run_sft, "train": _run_train, "data": _run_data,
                "caption": _run_caption, "compile": _run_compile, "eval": _run_eval,
                "export": _run_export}


class _QuietLibraries:
  """Drops library warnings that are expected in every balcap run and would bury its output."""

  EXPECTED = ("Using custom data configuration",  # TFDS: every CapWorld size is a config
              "has no dataset_info.json",         # TFDS: a data set about to be generated
              "OpenCV is not installed")          # TFDS: PIL decodes our images fine

  def filter(self, record) -> bool:
    return not any(text in str(record.msg) for text in self.EXPECTED)


def default_workdir(config_path: str) -> str:
  stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", stem)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and TFDS log every file they touch at INFO; show warnings unless asked (-v 0).
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_QuietLibraries())
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax  # pylint: disable=import-outside-toplevel  (after distributed initialisation)

  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  try:
    configs.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  except configs.ConfigError as e:
    sys.exit(f"balcap: {e}")
  runner = MODE_RUNNERS[config.mode]  # validate() accepts configs.MODES only
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"]))
  if jax.process_index() == 0:  # workdir may be a bucket (gs://...)
    paths.write_text(os.path.join(workdir, "config.json"),
                     json.dumps(config.to_dict(), indent=2, default=str))
  logging.info("mode %s, workdir %s, %d devices on %d processes", config.mode, workdir,
               jax.device_count(), jax.process_count())
  try:
    runner(config, workdir)
  except configs.BalcapError as e:  # bad data or settings found while running: no traceback
    sys.exit(f"balcap: {e}")


if __name__ == "__main__":
  app.run(main)
