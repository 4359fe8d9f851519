"""A small byte-level BPE vocabulary for CapWorld: the demo policy's tokenizer.

The real Qwen vocabulary has 151,936 tokens; over it, a tiny model's output projection costs
more than all its layers together and its sampler sorts through 150k ids per step. CapWorld's
language is a closed lexicon, so 1,024 tokens learned from its captions cover it with about one
token per word, and byte-level fallback still encodes any text. The special tokens are Qwen's
own strings (so `balcap.processing.qwen` works unchanged) at fixed ids 0-6.

    python -m balcap.data.capworld.tokenizer --out balcap/data/capworld/tokenizer

regenerates the shipped `tokenizer/tokenizer.json` (deterministic: same corpus, same merges).
"""

from __future__ import annotations

import argparse
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from balcap.data.capworld.flaws import META_SENTENCES
from balcap.data.capworld.generate import CapWorldSpec, make_example
from balcap.processing import qwen

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")
VOCAB_SIZE = 1024
SPECIAL_TOKENS = (qwen.ENDOFTEXT, qwen.IM_START, qwen.IM_END, qwen.VISION_START,
                  qwen.VISION_END, qwen.IMAGE_PAD, "<|video_pad|>")
CORPUS_EXAMPLES = 3000


def corpus(num_examples: int = CORPUS_EXAMPLES) -> list[str]:
  """References and SFT captions of the training split, plus the chat template's words."""
  spec = CapWorldSpec(image_sizes=((112, 112),))
  texts = ["system", "user", "assistant", qwen.DEFAULT_SYSTEM_PROMPT,
           "Describe this image in detail.", *META_SENTENCES]
  for index in range(num_examples):
    example = make_example(spec, "train", index)
    texts += list(example["references"]) + [example["sft_caption"]]
  return texts


def build(num_examples: int = CORPUS_EXAMPLES) -> tokenizers.Tokenizer:
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(corpus(num_examples), trainer)
  return tokenizer


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=FOLDER)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "tokenizer.json")
  build().save(path)
  print(path)


if __name__ == "__main__":
  main()
