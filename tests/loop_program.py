"""A small run of the shared step loop, imported by tests and by the subprocesses they kill."""

import time

from balcap import configs, loop, parallel, train
from balcap.data import pipeline


class Source:
  """37 examples shaped like TFDS's, so epochs end inside batches of 8."""

  def __len__(self):
    return 37

  def __getitem__(self, i):
    return {"id": f"ex{i}".encode(), "references": [("w " * (i % 7 + 1)).encode()]}


def run(workdir, num_steps, step_delay=0.0):
  """The data-pass step of `train` in the loop, data over every device (8 in tests)."""
  config = configs.base_config()
  config.num_steps, config.batch_size = num_steps, 8
  config.checkpoint.every_steps = 3
  config.metrics.tensorboard = config.metrics.progress_bar = False
  mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
  data_step = train.make_data_pass_step(mesh)

  def step_fn(state, batch, step):
    time.sleep(step_delay)  # gives a test time to signal the process mid-run
    out = data_step(state, batch, step)
    print("STEP", step, flush=True)
    return out

  iterator = pipeline.train_iterator(Source(), batch_size=parallel.host_batch_size(8), seed=0,
                                     read_threads=1)
  return loop.run(workdir=str(workdir), config=config, state=train.data_pass_state(mesh),
                  data_iterator=iterator, step_fn=step_fn)


def digest(result):
  return int(result.state["ids_digest"]), int(result.state["examples_seen"])
