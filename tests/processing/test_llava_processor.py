"""balcap.processing.llava against transformers' LlavaProcessor (CLIPImageProcessorPil, a LLaMA
SentencePiece tokenizer trained in the test): ids, pixels, padding, responses, errors."""

import numpy as np
import pytest
from PIL import Image

from balcap.processing import llava
from llava_fixtures import IMAGE_ID, IMAGE_SIZE, PAD_ID, reference_processor, write_tokenizer


def noise_image(width, height, mode="RGB", seed=0):
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  pixels = np.random.RandomState(seed).randint(0, 256, (height, width, channels), np.uint8)
  return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llava_tokenizer"))
  write_tokenizer(path)
  return path


@pytest.fixture(scope="module")
def reference(folder):
  import transformers  # pylint: disable=import-outside-toplevel
  return reference_processor(transformers.AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def processor(folder):
  return llava.LlavaProcessor.from_pretrained(folder)


def rendered(prompt, images=1):
  """llava-hf's chat template for one user turn with the generation prompt."""
  return "USER: " + "<image>\n" * images + prompt + " ASSISTANT:"


@pytest.mark.parametrize("size,mode", [((60, 40), "RGB"), ((31, 90), "RGB"), ((28, 28), "L"),
                                       ((50, 50), "RGBA")])
def test_pixels_and_ids_equal_the_reference(processor, reference, size, mode):
  image = noise_image(*size, mode=mode)
  prompt = "Describe this image in detail."
  ours = processor(prompts=[prompt], images=[image])
  theirs = reference(text=[rendered(prompt)], images=[image], return_tensors="np")
  np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
  np.testing.assert_array_equal(ours["pixel_values"], theirs["pixel_values"])
  assert (ours["input_ids"] == IMAGE_ID).sum() == 4
  assert ours["input_ids"][0, 0] == processor.token_ids.bos_id


def test_batch_with_padding_and_a_text_only_row(processor, reference):
  prompts = ["What is shown?", "Describe this image in detail, please, with every shape."]
  images = [noise_image(40, 30, seed=1), None]
  ours = processor(prompts=prompts, images=images, padding_side="left")
  for row, (prompt, image) in enumerate(zip(prompts, images)):
    theirs = reference(text=[rendered(prompt, images=int(image is not None))],
                       images=[image] if image else None, return_tensors="np")["input_ids"][0]
    real = ours["attention_mask"][row].astype(bool)
    np.testing.assert_array_equal(ours["input_ids"][row][real], theirs)
    assert (ours["input_ids"][row][~real] == PAD_ID).all()
    assert not real[0] or row == 1  # the shorter row is left-padded
  assert ours["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_responses_end_with_eos_and_leave_the_prompt_ids_unchanged(processor, reference):
  prompt, answer = "What is shown?", "A red circle sits on the left."
  image = noise_image(30, 30)
  chat = processor(prompts=[prompt], images=[image], responses=[answer], padding_side="right")
  alone = processor(prompts=[prompt], images=[image])
  prompt_length = alone["input_ids"].shape[1]
  np.testing.assert_array_equal(chat["input_ids"][0, :prompt_length], alone["input_ids"][0])
  response = chat["input_ids"][0][chat["response_mask"][0]]
  assert response[-1] == processor.token_ids.eos_id
  # The full conversation as the reference tokenizes it: prompt, " answer", </s>.
  full = reference(text=[rendered(prompt) + " " + answer], images=[image],
                   return_tensors="np")["input_ids"][0]
  np.testing.assert_array_equal(np.concatenate([alone["input_ids"][0], response[:-1]]), full)
  assert processor.decode(response) == answer


def test_pad_to_square_keeps_the_whole_image(processor):
  """LLaVA-1.5's own preprocessing: pad with the mean colour, then resize; nothing cropped."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  padded = llava.LlavaProcessor(processor.tokenizer, dataclasses.replace(
      processor.image_config, pad_to_square=True), processor.num_image_tokens)
  wide = Image.new("RGB", (56, 28), (255, 0, 0))
  pixels = padded(prompts=["x"], images=[wide])["pixel_values"][0]
  # Rows 0-6 and 21-27 are the mean-colour bands (normalised to ~0), the middle is red.
  assert np.abs(pixels[:, :5]).max() < 0.05 and np.abs(pixels[:, -5:]).max() < 0.05
  red = (1.0 - 0.48145466) / 0.26862954
  np.testing.assert_allclose(pixels[0, 10:18], red, atol=0.02)
  cropped = processor(prompts=["x"], images=[wide])["pixel_values"][0]
  np.testing.assert_allclose(cropped[0], red, atol=0.02)  # the centre crop keeps only red


def test_bad_inputs_name_the_culprit(processor):
  with pytest.raises(ValueError, match=r"prompts\[1\] contains the special token '<image>'"):
    processor(prompts=["ok", "see <image> here"])
  with pytest.raises(TypeError, match=r"images\[0\] is a str"):
    processor(prompts=["ok"], images=["not an image"])
  with pytest.raises(ValueError, match="different lengths"):
    processor(prompts=["a", "b"], responses=["only one"])


def test_a_sentencepiece_only_folder_tokenizes_the_same(folder, processor, tmp_path):
  """Older LLaMA checkpoints ship `tokenizer.model` without `tokenizer.json`: transformers
  converts it, with the added `<pad>` and `<image>` from tokenizer_config.json."""
  import shutil  # pylint: disable=import-outside-toplevel
  only = tmp_path / "spm_only"
  shutil.copytree(folder, only)
  (only / "tokenizer.json").unlink()
  converted = llava.LlavaProcessor.from_pretrained(str(only))
  assert converted.token_ids == processor.token_ids
  prompts = ["Describe this image in detail.", "Hello world! A red circle."]
  images = [noise_image(30, 30), None]
  for key in ("input_ids", "attention_mask"):
    np.testing.assert_array_equal(converted(prompts=prompts, images=images)[key],
                                  processor(prompts=prompts, images=images)[key])
