"""The sampler against transformers' generate, against teacher forcing, and against statistics.

The model-dependent tests run once per family (Qwen2.5-VL, LLaVA-1.5) on tiny random
checkpoints that transformers wrote: one sampler serves both.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from balcap import models, parallel, sampling, scoring
from balcap.models import policy as policy_lib
import llava_fixtures
import qwen_fixtures

NEAR_TIE = 1e-5


class Qwen:
  """Qwen2.5-VL: images as patch grids; ids 250-253 are its vision specials."""
  fixtures = qwen_fixtures
  eos, specials = 255, (250, 251, 252, 253)

  @staticmethod
  def image(size):  # size 0, 1, 2: three different grids
    return [(1, 8, 8), (1, 6, 4), (1, 4, 6)][size]

  @staticmethod
  def reference_kwargs(model, inputs):
    ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
    return dict(image_grid_thw=torch.tensor(inputs["image_grid_thw"]),
                mm_token_type_ids=(ids == model.config.image_token_id).int())


class Llava:
  """LLaVA-1.5: fixed-size CLIP images; `<pad>` and `<image>` are its specials."""
  fixtures = llava_fixtures
  eos, specials = llava_fixtures.VOCAB - 1, (llava_fixtures.PAD_ID, llava_fixtures.IMAGE_ID)

  @staticmethod
  def image(size):
    del size
    return True

  @staticmethod
  def reference_kwargs(model, inputs):
    del model, inputs
    return {}


FAMILIES = {"qwen": Qwen, "llava": Llava}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """family name -> (folder, transformers model, family adapter), written on first use."""
  cache = {}

  def get(name):
    if name not in cache:
      family = FAMILIES[name]
      folder = str(tmp_path_factory.mktemp(f"{name}_sampling"))
      cache[name] = (folder, family.fixtures.write_checkpoint(
          folder, family.fixtures.tiny_config(), seed=5), family)
    return cache[name]
  return get


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, checkpoints):
  return checkpoints(request.param)


# Both layer layouts for Qwen; LLaVA shares the decoder code, so one layout suffices there.
@pytest.fixture(scope="module", params=[("qwen", False), ("qwen", True), ("llava", False)],
                ids=["qwen-unrolled", "qwen-scanned", "llava-unrolled"])
def policy(request, checkpoints):
  name, scan_layers = request.param
  folder, reference, family = checkpoints(name)
  policy = models.load_pretrained(folder, scan_layers=scan_layers)
  policy.adapter, policy.reference = family, reference  # the family's test adapter, transformers
  return policy


def prompts(family, seed=0):
  rng = np.random.default_rng(seed)
  # Three prompts of different lengths: two images (of different sizes where the family has
  # them) and a text-only row.
  return family.fixtures.batch(rng, [([1, 2, 3, 4, 5], family.image(0)),
                                     ([6, 7, 8], family.image(1)),
                                     (list(rng.integers(0, 240, 13)), None)])


def transformers_greedy(model, family, inputs, max_new_tokens):
  ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
  kwargs = dict(input_ids=ids, attention_mask=torch.tensor(inputs["attention_mask"]),
                pixel_values=torch.tensor(inputs["pixel_values"]),
                **family.reference_kwargs(model, inputs))
  with torch.no_grad():
    out = model.generate(**kwargs, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=family.eos, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
  tokens = out.sequences[:, ids.shape[1]:].numpy()
  scores = torch.stack(out.scores, dim=1).numpy()  # [B, steps, V]
  return tokens, scores


def test_greedy_tokens_equal_transformers_generate(policy):
  reference, family = policy.reference, policy.adapter
  inputs = prompts(family)
  ours = sampling.generate(policy, policy.params, inputs, jax.random.key(0), max_new_tokens=24,
                           temperature=0.0, eos_token_ids=(family.eos,), forbidden_token_ids=())
  theirs, scores = transformers_greedy(reference, family, inputs, 24)
  ours_tokens = np.asarray(ours.tokens)
  near_ties = 0
  for row in range(len(theirs)):
    mismatch = np.flatnonzero(ours_tokens[row, :theirs.shape[1]] != theirs[row])
    if mismatch.size:
      step = mismatch[0]
      top2 = np.sort(scores[row, step])[-2:]
      assert top2[1] - top2[0] < NEAR_TIE, (
          f"row {row} diverges at step {step} where the reference's top-2 gap is "
          f"{top2[1] - top2[0]:.2e} (not a near-tie): ours {ours_tokens[row]}, "
          f"transformers {theirs[row]}")
      near_ties += 1
  print(f"greedy parity: {len(theirs) - near_ties}/{len(theirs)} rows identical, {near_ties} "
        "diverge at a near-tie")
  assert near_ties <= 1


@pytest.mark.parametrize("temperature,micro_batches", [(1.0, 1), (0.7, 3)])
def test_sampler_logprobs_equal_teacher_forced_logprobs(policy, temperature, micro_batches):
  inputs = prompts(policy.adapter, 1)
  rollouts = sampling.generate(policy, policy.params, inputs, jax.random.key(1),
                               max_new_tokens=16, num_samples=3, temperature=temperature,
                               eos_token_ids=(policy.adapter.eos,))
  continuation = scoring.continuation_batch(policy, inputs, rollouts.tokens, rollouts.lengths,
                                           num_samples=3)
  np.testing.assert_array_equal(np.asarray(continuation.mask).sum(axis=1), rollouts.lengths)
  # (3 strided micro-batches of the 9 rows: the logprobs come back in row order.)
  forced = scoring.continuation_logprobs(policy, policy.params, continuation, temperature,
                                         num_micro_batches=micro_batches)
  real = np.arange(16)[None] < np.asarray(rollouts.lengths)[:, None]
  assert real.sum() > 40
  diff = np.abs(np.asarray(forced) - np.asarray(rollouts.logprobs))[real].max()
  print(f"sampler vs teacher-forced logprobs: max |diff| {diff:.2e} over {real.sum()} tokens")
  assert diff <= 1e-4, diff
  # The G rollouts of a prompt differ: they share the prefix, not the randomness.
  tokens = np.asarray(rollouts.tokens).reshape(3, 3, -1)
  assert all(len({tuple(r) for r in group}) > 1 for group in tokens)


def test_rollouts_end_at_eos_then_pad(policy):
  inputs = prompts(policy.adapter, 2)
  greedy = sampling.generate(policy, policy.params, inputs, jax.random.key(0), max_new_tokens=6,
                             temperature=0.0, eos_token_ids=(policy.adapter.eos,),
                             forbidden_token_ids=())
  first = int(np.asarray(greedy.tokens)[0, 1])  # make row 0's second token the end
  ended = sampling.generate(policy, policy.params, inputs, jax.random.key(0), max_new_tokens=6,
                            temperature=0.0, eos_token_ids=(first,), forbidden_token_ids=(),
                            pad_token_id=7)
  tokens, lengths = np.asarray(ended.tokens), np.asarray(ended.lengths)
  assert lengths[0] <= 2 and bool(ended.finished[0])
  assert (tokens[0, lengths[0]:] == 7).all() and (np.asarray(ended.logprobs)[0, lengths[0]:]
                                                   == 0).all()
  assert (lengths == np.where(np.asarray(ended.finished), lengths, 6)).all()


def test_special_tokens_are_never_sampled_even_when_likely(policy):
  rollouts = sampling.generate(policy, policy.params, prompts(policy.adapter, 3),
                               jax.random.key(3), max_new_tokens=48, num_samples=4,
                               temperature=20.0, eos_token_ids=(policy.adapter.eos,))
  sampled = np.asarray(rollouts.tokens)
  assert not np.isin(sampled, policy.adapter.specials).any()
  assert len(np.unique(sampled)) > 150  # near-uniform: the ban, not the model, kept them out


def test_same_seed_same_rollouts_other_seed_others(policy):
  run = lambda seed: np.asarray(sampling.generate(
      policy, policy.params, prompts(policy.adapter, 4), jax.random.key(seed), max_new_tokens=8,
      num_samples=2, eos_token_ids=(policy.adapter.eos,)).tokens)
  np.testing.assert_array_equal(run(11), run(11))
  assert (run(11) != run(12)).any()


def test_prompt_lengths_share_one_program(checkpoint):
  folder, _, family = checkpoint
  policy = models.load_pretrained(folder, scan_layers=False)
  rng = np.random.default_rng(5)
  before = sampling.compiled_programs()
  for length in (3, 9, 30):
    inputs = family.fixtures.batch(rng, [(list(rng.integers(0, 240, length)), family.image(2)),
                                         (list(rng.integers(0, 240, length + 2)),
                                          family.image(2))])
    sampling.generate(policy, policy.params, inputs, jax.random.key(0), max_new_tokens=4,
                      eos_token_ids=(family.eos,))
  assert sampling.compiled_programs() - before == 1


@pytest.mark.parametrize("gather_weights", [True, False], ids=["gathered", "fsdp"])
def test_sharded_sampling_equals_one_device(checkpoint, gather_weights):
  # Scanned layers on the mesh: the sampler splits them, and (gathered) places the decoder's
  # weights over tensor only; neither may change a token.
  folder, _, family = checkpoint
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = models.load_pretrained(folder, mesh=mesh, scan_layers=True)
  single = models.load_pretrained(folder, scan_layers=False)
  placed = sampling.decoder_shardings(sampling.decode_module(sharded.module), mesh,
                                      gather_weights)
  used = {axis for s in jax.tree.leaves(placed) for entry in s.spec if entry is not None
          for axis in ((entry,) if isinstance(entry, str) else entry)}
  assert used == ({"tensor"} if gather_weights else {"fsdp", "tensor"})
  rng = np.random.default_rng(6)
  inputs = family.fixtures.batch(rng, [([1, 2, 3], family.image(2)),
                                       ([4, 5, 6, 7], family.image(1)),
                                       ([8, 9], family.image(0)), ([10, 11, 12, 13, 14], None)])
  args = dict(max_new_tokens=10, num_samples=2, temperature=0.8, eos_token_ids=(family.eos,))
  a = sampling.generate(sharded, sharded.params, inputs, jax.random.key(9),
                        gather_weights=gather_weights, **args)
  b = sampling.generate(single, single.params, inputs, jax.random.key(9), **args)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The token distribution


def chi_square_critical(df: int, z: float = 3.09) -> float:
  """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation."""
  return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def truncated(logits, temperature, top_k, top_p, forbidden):
  """The reference distribution, written the slow, obvious way."""
  logits = np.array(logits, np.float64) / temperature
  logits[list(forbidden)] = -np.inf
  order = np.argsort(-logits)
  keep = np.zeros_like(logits, bool)
  keep[order[:top_k or len(logits)]] = True
  probs = np.where(keep, np.exp(logits - logits[order[0]]), 0)
  probs /= probs.sum()
  cumulative, nucleus = 0.0, np.zeros_like(keep)
  for index in np.argsort(-probs):
    if cumulative >= top_p:
      break
    nucleus[index] = True
    cumulative += probs[index]
  probs = np.where(nucleus, probs, 0)
  return probs / probs.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8), (1.3, 8, 0.9)])
def test_token_frequencies_match_the_truncated_distribution(temperature, top_k, top_p):
  logits = np.array([2.0, 1.5, 1.4, 0.3, 0.0, -0.2, -0.5, -1.0, -1.1, -2.0, 1.0, 0.9],
                    np.float32)
  forbidden = (10,)
  draws = 40_000
  spec = sampling.SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k,
                                 top_p=top_p, forbidden_token_ids=forbidden)
  tokens, _ = jax.jit(lambda k: sampling.sample_tokens(
      jnp.broadcast_to(logits, (draws, len(logits))), k, spec))(jax.random.key(42))
  counts = np.bincount(np.asarray(tokens), minlength=len(logits))
  expected = truncated(logits, temperature, top_k, top_p, forbidden) * draws
  assert counts[expected == 0].sum() == 0  # nothing outside the truncation, nothing banned
  support = expected > 0
  statistic = (((counts - expected) ** 2)[support] / expected[support]).sum()
  assert statistic < chi_square_critical(int(support.sum()) - 1), (counts, expected)


def test_logprob_is_of_the_full_tempered_distribution():
  logits = jnp.array([[3.0, 1.0, 0.5, -1.0]])
  spec = sampling.SamplingParams(max_new_tokens=1, temperature=0.5, top_k=2)
  token, logprob = sampling.sample_tokens(logits, jax.random.key(0), spec)
  expected = jax.nn.log_softmax(logits / 0.5)[0, token[0]]
  np.testing.assert_allclose(logprob[0], expected, atol=1e-6)
  greedy = sampling.SamplingParams(max_new_tokens=1, temperature=0.0)
  token, logprob = sampling.sample_tokens(logits, jax.random.key(0), greedy)
  assert int(token[0]) == 0
  np.testing.assert_allclose(logprob[0], jax.nn.log_softmax(logits)[0, 0], atol=1e-6)


def test_weights_cast_once_sample_exactly_as_weights_cast_in_every_layer(checkpoint):
  # float32 params computing in bfloat16 (the real configs): the sampler casts them once,
  # before the prefill, so decode steps read half the bytes. Every layer casts its weights to
  # the compute dtype on use, so the rollouts must be bit for bit those of uncast params.
  folder, _, family = checkpoint
  loaded = models.load_pretrained(folder, scan_layers=True)
  policy = dataclasses.replace(loaded, config=loaded.config.with_runtime(dtype="bfloat16"))
  inputs = prompts(family, seed=3)
  spec = sampling.sampling_params(policy, max_new_tokens=6, num_samples=2, temperature=1.0,
                                  eos_token_ids=(family.eos,))
  assert spec.weights_dtype == "bfloat16"
  cast_lm = sampling.decode_params(policy.params, spec.weights_dtype)["lm"]
  assert {x.dtype for x in jax.tree.leaves(cast_lm)} == {jnp.dtype(jnp.bfloat16)}
  prepared = sampling.prepare_prompts(policy, inputs)
  start = policy.family.decode_start(policy.config, prepared).astype(np.int32)
  placed = policy_lib.model_inputs(prepared)
  run = lambda s: sampling.generate_prepared(policy, policy.params, placed, start,  # noqa: E731
                                             jax.random.key(4), s)
  cast, uncast = run(spec), run(dataclasses.replace(spec, weights_dtype=""))
  np.testing.assert_array_equal(np.asarray(cast.tokens), np.asarray(uncast.tokens))
  np.testing.assert_array_equal(np.asarray(cast.logprobs), np.asarray(uncast.logprobs))
  assert jax.tree.leaves(policy.params)[0].dtype == np.float32  # the caller's params uncast
