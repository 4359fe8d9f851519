"""The CPU demo: a tiny policy on CapWorld, SFT warm start then c-GDPO RL, in minutes on 2 cores.

    python -m balcap.main --config=configs/tiny.py
    python -m balcap.main --config=configs/tiny.py:mode=data     # only prepare the data

In this version of balcap (no policy or learner yet) `train` prepares CapWorld and runs the
training loop over the input pipeline; see `balcap/train.py`.
"""

from balcap import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, mode="train")
  c = configs.base_config()
  c.mode = arg.mode
  c.seed = 0
  c.num_steps = 60
  c.batch_size = 16

  # CapWorld small enough to generate in seconds; 112 px images are 16 vision tokens.
  c.data.capworld.num_train = 2_000
  c.data.capworld.num_validation = 100
  c.data.capworld.num_test = 100
  c.data.capworld.image_sizes = ((112, 112),)
  c.data.read_threads = 2  # this is a 2-core machine

  # The demo's policy: Qwen2.5-VL's architecture at a size a 2-core CPU trains in minutes,
  # initialised at random, with the real Qwen vocabulary and special-token ids.
  c.model.checkpoint = ""
  c.model.dtype = c.model.param_dtype = "float32"  # CPU: fp32 matmuls are the fast ones
  c.model.scan_layers = False  # CPU: unrolled layers decode faster
  c.model.architecture = {
      "family": "qwen2_5_vl",
      "text": dict(vocab_size=151936, hidden_size=64, intermediate_size=256, num_layers=2,
                   num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 3),
                   tie_word_embeddings=True),
      "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                     out_hidden_size=64, window_size=56, fullatt_block_indexes=(1,)),
  }
  c.model.max_pixels = 112 * 112

  c.checkpoint.every_steps = 20
  c.checkpoint.keep = 2
  c.metrics.log_every_steps = 5
  return c
