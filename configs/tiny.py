"""The CPU demo: a tiny policy on CapWorld, SFT warm start then c-GDPO RL, in minutes on 2 cores.

    python -m balcap.main --config=configs/tiny.py
    python -m balcap.main --config=configs/tiny.py:mode=data     # only prepare the data
    python -m balcap.main --config=configs/tiny.py:hardware=tpu  # FSDP over every TPU chip

A Qwen2.5-VL-architecture policy of about 1M parameters, initialised at random, learns to caption
CapWorld scenes of one object: its vision tower first learns to see objects (vision
pre-training on the scene graphs), then the policy imitates CapWorld's flawed "SFT" captions
(meta commentary, repetition, wrong colours and shapes, bad lengths, half of them too short;
some hedge, naming no shape), then c-GDPO trains it against the exact CapWorld judge. The
run ends with a before/after table on the test split.
"""

import os

from balcap import configs
from balcap.data import capworld


def get_config(arg=None):
  arg = configs.parse_arg(arg, mode="train", hardware="cpu")
  c = configs.base_config()
  c.mode = arg.mode
  c.mesh = configs.mesh_preset(arg.hardware)  # cpu: every device a data-parallel replica
  c.seed = 0

  # CapWorld small enough to generate in seconds. 224 px images (64 vision tokens): the
  # smallest object then fills a whole merged vision token. At 112 px (16 tokens) it fills a
  # quarter of one, and a policy trained from scratch in minutes never starts reading the
  # image (its validation loss with the images shuffled stays equal to the loss with them
  # through 400 SFT steps); at 224 px it starts after ~300.
  c.data.capworld.num_train = 4_000
  c.data.capworld.num_validation = 100
  # 500 test images: the before/after table's b-CapScore then has a standard error of 1.0-1.6
  # points before RL (the terse SFT policy's scores vary most) and 0.4-0.6 after, its change a
  # paired one of 1.1-1.6 against gains of 57-67 (the table prints them).
  c.data.capworld.num_test = 500
  c.data.capworld.image_sizes = ((224, 224),)
  # One object per image. With two (`--config.data.capworld.max_objects=2`) this policy cannot
  # bind its second sentence to the second object, nor always tell that there are two (its
  # counts are right 79% of the time): RL then pads captions to the length band by describing
  # the first object again, and 22-40% of its captions restate themselves (seed 0, README).
  # With one, every caption can be honest, and the demo measures what RL does to a
  # captioner's habits: guessed shapes, commentary, repetition, length.
  c.data.capworld.max_objects = 1
  # A terse SFT set: 40% of the SFT captions are written too short on purpose (a bare listing,
  # "A red circle."; with the ~19% too short anyway, 47% in all), the habit of a captioner
  # fine-tuned on short human captions. Without it the SFT policy's greedy captions repeat
  # sentences to 2.7-2.8x the reference's length and already state every fact this policy can
  # read, so RL raises precision but recall can only fall (by the shapes and regions it had
  # guessed right by chance; README). With it the SFT policy is terse ("A black triangle.",
  # 4-7 words), and RL must learn both halves of the method: to say the count, background and
  # size it can see (recall) and to stop naming the shape it cannot (precision).
  c.data.capworld.terse_share = 0.4
  c.data.read_threads = 2  # this is a 2-core machine

  # The policy: Qwen2.5-VL's architecture at a size a 2-core CPU trains in minutes, over
  # CapWorld's own 865-token vocabulary (the real one would make the output layer most of the
  # model); its special tokens are Qwen's strings at ids 0-6. The embedding has 896 rows, a
  # multiple of 128 like Qwen's own padded 151936, so it shards over any tensor axis; the
  # sampler never draws the 31 rows past the tokenizer.
  c.model.checkpoint = ""
  c.model.tokenizer = os.path.join(os.path.dirname(capworld.__file__), "tokenizer")
  c.model.dtype = c.model.param_dtype = "float32"  # CPU: fp32 matmuls are the fast ones
  c.model.scan_layers = False  # CPU: unrolled layers decode faster
  c.model.architecture = configs.full_architecture({
      "family": "qwen2_5_vl",
      "text": dict(vocab_size=896, hidden_size=128, intermediate_size=384, num_layers=4,
                   num_heads=4, num_kv_heads=2, mrope_section=(4, 6, 6),
                   tie_word_embeddings=True),
      "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                     out_hidden_size=128, window_size=56, fullatt_block_indexes=(1,)),
      "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3,
      "vision_end_token_id": 4, "eos_token_ids": (2,),
  })
  c.model.max_pixels = 224 * 224

  c.sampling.max_new_tokens = 96  # references are ~22 words (~30 tokens)
  c.sampling.prompt_bucket = 64

  # The vision tower first learns to name each object's shape, colour and size from the scene
  # graphs, as a real captioner starts from a pretrained vision encoder
  # (`balcap.vision_pretrain`, ~100 s). Without it the policy starts reading the image only
  # after ~350 SFT steps and names colours right 42% of the time after 700; with it, from
  # ~200 steps, and 60% after 600 (seed 0, README).
  c.vision_pretrain.num_steps = 400
  c.vision_pretrain.batch_size = 16
  c.sft.num_steps = 700
  c.sft.batch_size = 16
  c.sft.max_length = 256
  c.sft.optimizer.learning_rate = 2e-3
  c.sft.optimizer.warmup_steps = 30
  c.sft.optimizer.schedule = "cosine"
  c.sft.optimizer.min_learning_rate_ratio = 0.1
  # Then the tower (not its merger, the projector into the language model) is frozen in both
  # stages, as LLaVA freezes its ViT: its backward pass is skipped (`optim.stop_frozen`), an
  # SFT step takes 0.81x the time (0.56 s against 0.69 s with the tower at 1/100 of the rate,
  # this 2-core machine), which pays for the vision stage. At the full rate the tower cannot
  # train here: Adam moves every weight by about the rate per step, so the patch embedding's
  # 1176 inputs (all ~+1.9 on CapWorld's pale backgrounds) shift every patch's feature by
  # ~lr * 1176 * 1.9, ~4.5 per step at 2e-3 against features of size ~1.3; the features
  # collapse within ~20 steps and the policy never reads the image.
  frozen_tower = ("^visual/(patch_embed|blocks)/",)
  c.sft.optimizer.freeze = frozen_tower
  # Whether the policy reads the image: sft/image_gain in workdir/sft/metrics.jsonl (README).
  c.sft.image_gain_every = 100

  c.rl.num_steps = 120
  c.rl.batch_size = 8
  c.rl.group_size = 8
  # 3e-4 collapses the policy onto one caption for every image within 80 steps; 1e-4 is still
  # climbing after 150.
  c.rl.optimizer.learning_rate = 2e-4
  c.rl.optimizer.warmup_steps = 5
  c.rl.optimizer.freeze = frozen_tower
  c.rl.sample_table_every = 20
  c.rl.final_eval_examples = -1  # the whole test split
  c.rewards.judge = "capworld"
  # GDPO's reward conditioning: precision pays only when recall >= 0.5 (the median of the SFT
  # policy before the terse set; the terse one starts at 0.20-0.23, and its after-RL captions cover
  # 0.50-0.56, all the facts it can read). Unconditioned, RL buys precision by saying less (before
  # vision pre-training, seed 0: precision +0.49, recall -0.14, b-CapScore +3.2); conditioned, a
  # caption too thin to cover the scene earns no precision. (0.3 was the SFT mean before vision
  # pre-training; with it, 0.3 and 0.5 gave +23.1 and +21.0 on seed 0, recall -0.02 and -0.01.)
  c.advantage.conditioned = "precision"
  c.advantage.condition_on = "recall"
  c.advantage.condition_threshold = 0.5

  c.batch_size = 64  # mode caption and the before/after evaluations
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 2
  c.metrics.log_every_steps = 10
  return c
