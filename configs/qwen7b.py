"""Qwen2.5-VL-7B-Instruct: the architecture as published, the checkpoint, the mesh.

    python -m balcap.main --config=configs/qwen7b.py:hardware=tpu \
        --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct --workdir=gs://bucket/runs/7b

`hardware`: `tpu` (a TPU v5e / v4 pod slice: weights split 4 ways over `tensor`, FSDP over
the rest of the chips) or `gpu8` (one host with 8 GPUs: FSDP over 8, tensor parallel for
decoding speed off) or `cpu` (smoke tests).
The architecture below is checked against the checkpoint's config.json when both are given.
RL settings: `configs.paper_rl_settings` (G 8, 128 prompts, lr 1e-6, clip 0.2/0.28, no KL,
512 new tokens, an OpenAI-compatible judge): set `--config.rewards.openai.base_url=` and
`--config.rewards.openai.model=`, and your data (`--config.data.name=caption_folder
--config.data.caption_folder.manifest=...`).
"""

from balcap import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, mode="train", hardware="tpu")
  c = configs.base_config()
  c.mode = arg.mode
  c.model.checkpoint = ""  # the HF folder of Qwen/Qwen2.5-VL-7B-Instruct
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"  # 28 layers of 3584 at RL batch sizes do not fit without it
  c.model.architecture = configs.full_architecture({
      "family": "qwen2_5_vl",
      # From Qwen/Qwen2.5-VL-7B-Instruct config.json (transformers 4.41.2 format).
      "text": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                   num_heads=28, num_kv_heads=4, rope_theta=1_000_000.0,
                   mrope_section=(16, 24, 24), rms_norm_eps=1e-6, hidden_act="silu",
                   tie_word_embeddings=False, max_position_embeddings=128_000),
      "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                     out_hidden_size=3584, in_channels=3, patch_size=14, temporal_patch_size=2,
                     spatial_merge_size=2, window_size=112, fullatt_block_indexes=(7, 15, 23, 31),
                     hidden_act="silu", tokens_per_second=2),
      "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
      "vision_end_token_id": 151653, "eos_token_ids": (151645,),
  })
  c.mesh = configs.mesh_preset(arg.hardware)
  if arg.hardware == "tpu":
    # 16 GiB chips: with every chip one FSDP shard the decoder's bf16 weights (15.2 GB) cannot
    # be gathered on each chip for sampling. Split four ways over `tensor` they can, and every
    # program fits with room (v5e-64, fsdp 16 x tensor 4, per chip: sample 4.93 GiB, score
    # 1.59, update 6.27 of 16). Roofline per RL step ~7.5 s (decode 5.8 ms x 512 + score 0.97 s
    # + update 3.6 s) against ~30 s at fsdp 64 (48 ms x 512 + 1.0 + 4.7). README, compile report.
    c.mesh.tensor = 4
  return configs.paper_rl_settings(c)
