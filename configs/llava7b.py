"""LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): the architecture as published, the checkpoint, the mesh.

    python -m balcap.main --config=configs/llava7b.py:hardware=tpu \
        --config.model.checkpoint=/ckpt/llava-1.5-7b-hf --workdir=gs://bucket/runs/llava7b

`hardware`: `tpu`, `gpu8` or `cpu`, as in configs/qwen7b.py. The architecture below is checked
against the checkpoint's config.json when both are given. Images are padded to a square with
the mean colour before CLIP's 336 px resize and crop, as LLaVA-1.5 was trained
(`config.model.pad_to_square`). RL settings: `configs.paper_rl_settings`; set
`--config.rewards.openai.base_url=`, `--config.rewards.openai.model=` and your data.
"""

from balcap import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, mode="train", hardware="tpu")
  c = configs.base_config()
  c.mode = arg.mode
  c.model.checkpoint = ""  # the HF folder of llava-hf/llava-1.5-7b-hf
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"  # 32 layers of 4096 and 576 image tokens per prompt
  c.model.pad_to_square = True
  c.model.architecture = configs.full_architecture({
      "family": "llava",
      # Vicuna-7B v1.5 (LLaMA-2 architecture) with llava-hf's <image> (32000) and <pad> (32001)
      # rows, padded to 32064.
      "text": dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32,
                   num_heads=32, num_kv_heads=32, rope_theta=10_000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=4096, tie_word_embeddings=False),
      # CLIP ViT-L/14 at 336 px; LLaVA reads the second-to-last block, class token dropped.
      "vision": dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                     image_size=336, patch_size=14, layer_norm_eps=1e-5,
                     hidden_act="quick_gelu", feature_layer=-2, select_strategy="default"),
      "image_token_id": 32000, "pad_token_id": 32001, "eos_token_ids": (2,),
      "projector_act": "gelu", "projector_bias": True,
  })
  c.mesh = configs.mesh_preset(arg.hardware)
  if arg.hardware == "tpu":
    # 16 GiB chips: with every chip one FSDP shard the decoder's bf16 weights (13.5 GB) cannot
    # be gathered on each chip for sampling. Split four ways over `tensor` they can, and every
    # program fits (v5e-64, fsdp 16 x tensor 4, per chip: sample 9.81 GiB, decode step 7.77,
    # score 1.18, update 9.18 of 16; 32 KV heads and 576 image tokens make its KV cache ~8x
    # Qwen 7B's). Roofline per RL step ~13 s (sampler 7.0 s: decode 13.6 ms x 512 at 1.33x
    # its ideal bytes; score 1.3 s; update 5.0 s at 0.97x the FLOP formula). README.
    c.mesh.tensor = 4
  c = configs.paper_rl_settings(c)
  if arg.hardware == "gpu8":
    # 8 x H100 (80 GB): at 128 prompts x G 8 the sampler's KV cache (32 KV heads, 576 image
    # tokens per prompt: ~40 GB per GPU) and the gathered bf16 weights (13.5 GB) leave the
    # decode step 20 GiB over in the compile report, whose XLA:CPU memory is an upper bound
    # (f32 copies of the bf16 weights, 27 GiB here). At 64 prompts every program fits with
    # room (decode step 64.6, update 47.6 of 74.5 GiB). On 8 x H200 (141 GB) the paper's 128
    # fit (decode step 94.6 GiB): --config.rl.batch_size=128. README, compile report.
    c.rl.batch_size = 64
  # CLIP's last block and pooler norm are loaded and saved but never used (features come from
  # block 22): frozen, they keep their checkpoint values and carry no Adam state (~50M params).
  unused = (r"^vision_tower/layers_23/", r"^vision_tower/post_layernorm/")
  c.sft.optimizer.freeze = c.rl.optimizer.freeze = unused
  return c
