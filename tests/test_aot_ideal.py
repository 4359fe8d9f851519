"""The compile report's ideal costs (`balcap.aot.ideal`) against sums done by hand."""

import pytest

from balcap import parallel
from balcap.aot import ideal, programs
from testlib import load_config_file

# A decoder small enough to count by hand: 2 layers, hidden 8, MLP 16, 2 heads of 4 (1 KV
# head), vocabulary 10.
DIMS = ideal.Dims(text_layers=2, text_hidden=8, text_intermediate=16, heads=2, kv_heads=1,
                  head_dim=4, vocab=10, vision_layers=0, vision_hidden=0,
                  vision_intermediate=0, vision_mlp_matrices=3, vision_window=0,
                  vision_full_blocks=0, projector_flops_per_image=0.0)


def test_text_flops_by_hand():
  # Per token and layer: q 8x8, k 8x4, v 8x4, o 8x8 = 192 weights; MLP 3 x 8x16 = 384;
  # 2 FLOPs a weight = 1152. Attention over 5 keys: 4 x 5 x 8 = 160. Per row: 3 tokens x
  # 2 layers x 1312 = 7872, plus 1 scored token x 2 x 8 x 10 = 160.
  assert ideal.text_flops(DIMS, rows=2, tokens=3, context=5, scored=1) == 2 * (7872 + 160)


def test_residual_and_training_bytes_by_hand():
  # 6 tokens, 2 layers, hidden 8, 2 bytes, a forward (2 passes): 2 x 2 x 6 x 8 x 2 = 384.
  assert ideal.residual_bytes(DIMS, tokens=6, itemsize=2, passes=2) == 384
  # Weights 100 B (decoder) and 10 B (vision) a use, 5 params in the device's shard, 2
  # micro-batches of 384 B forward residual. With remat, per micro-batch: 3 reads + 1 gradient
  # write of the weights (400), the f32 gradient shard read and written (40), the residual
  # 2.5 forwards (960): 1400; vision 4 x 10; the optimizer 7 x 4 x 5.
  assert ideal.training_bytes(100, 10, 5, 2, True, 384) == 2 * 1400 + 40 + 140
  # Without remat: 2 reads + 1 write (300), 40, 2 forwards of residual (768).
  assert ideal.training_bytes(100, 10, 5, 2, False, 384) == 2 * 1108 + 30 + 140


def test_the_updates_ideal_grows_by_a_micro_batchs_weight_traffic():
  # The same rollouts in 4 micro-batches instead of 1: the same residual stream, the decoder's
  # weights read 3 times and their gradients written and accumulated once more in each extra
  # micro-batch (tiny config: remat off -> 2 reads).
  config = load_config_file("tiny", "mode=compile")
  config.compile.image_size = (224, 224)
  config.rl.batch_size, config.sampling.max_new_tokens = 8, 16
  mesh = parallel.make_mesh(config.mesh)

  def update_bytes(micro_batch_size):
    config.rl.micro_batch_size = micro_batch_size
    builder = programs.Builder(config, mesh)
    (update,) = builder.programs(("update",))
    return update.ideal_bytes, builder

  one, builder = update_bytes(0)
  four, _ = update_bytes(16)
  assert config.model.remat == "none"
  weights = builder.weight_bytes(vision=False)
  shard = (builder.text_params + builder.vision_params) / builder.devices
  assert four - one == pytest.approx(3 * (3 * weights + 8 * shard))
