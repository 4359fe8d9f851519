"""balcap.processing.qwen against transformers: smart_resize, image patches, chat ids, padding."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from balcap.processing import qwen
from testlib import QWEN_TOKENIZER_DIR

# The official Qwen2.5-VL chat template (Qwen/Qwen2.5-VL-7B-Instruct, chat_template.json).
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")



def noise_image(width, height, mode="RGB", seed=0):
  """A deterministic random image; noise exercises every bicubic tap."""
  channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
  pixels = np.random.RandomState(seed).randint(0, 256, (height, width, channels), np.uint8)
  return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


@pytest.fixture(scope="module")
def reference_image_processor():
  # Imported here: transformers takes seconds to import and only these tests need it.
  from transformers.models.qwen2_vl import (  # pylint: disable=import-outside-toplevel
      image_processing_pil_qwen2_vl)
  return image_processing_pil_qwen2_vl


@pytest.fixture(scope="module")
def hf_tokenizer():
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.AutoTokenizer.from_pretrained(QWEN_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def processor():
  return qwen.QwenProcessor.from_pretrained(QWEN_TOKENIZER_DIR)


# --- smart_resize ---------------------------------------------------------------------------

def test_smart_resize_equals_transformers_on_a_grid_of_sizes(reference_image_processor):
  sides = (1, 3, 13, 27, 28, 29, 42, 57, 131, 224, 333, 999, 1000, 2047, 4000, 9000)
  bounds = ((56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 64), (256 * 28 * 28, 12845056))
  for min_pixels, max_pixels in bounds:
    for height in sides:
      for width in sides:
        if max(height, width) / min(height, width) > 200:
          continue
        expected = reference_image_processor.smart_resize(height, width, 28, min_pixels,
                                                          max_pixels)
        assert qwen.smart_resize(height, width, 28, min_pixels, max_pixels) == expected


def test_smart_resize_refuses_extreme_aspect_ratio_naming_the_size():
  with pytest.raises(ValueError, match=r"a 2010x10 px image \(width x height\) has aspect ratio "
                     r"201, over 200"):
    qwen.smart_resize(10, 2010)
  # Exactly 200 is allowed, as in transformers; 28 x 812 px is the area scaled up to min_pixels.
  assert qwen.smart_resize(10, 2000) == (28, 812)


# --- image patches --------------------------------------------------------------------------

IMAGE_CASES = {
    "tiny": [noise_image(3, 5)],
    "odd_57x131": [noise_image(57, 131)],
    "below_min_pixels": [noise_image(20, 30)],
    "hits_max_pixels": [noise_image(1500, 1100)],
    "rgba_with_transparency": [noise_image(64, 48, "RGBA")],
    "grayscale": [noise_image(90, 61, "L")],
    "grayscale_alpha": [noise_image(61, 90, "LA")],
    "several": [noise_image(57, 131, seed=1), noise_image(224, 224, seed=2),
                noise_image(300, 40, "RGBA", seed=3)],
}


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_pixel_values_equal_transformers_pil_processor(name, reference_image_processor):
  images = IMAGE_CASES[name]
  expected = reference_image_processor.Qwen2VLImageProcessorPil()(images=images,
                                                                  return_tensors="np")
  got = qwen.preprocess_images(images, qwen.QwenImageConfig())
  assert got["pixel_values"].dtype == np.float32 and got["image_grid_thw"].dtype == np.int64
  np.testing.assert_array_equal(got["image_grid_thw"], expected["image_grid_thw"])
  np.testing.assert_array_equal(got["pixel_values"], expected["pixel_values"])


def test_custom_pixel_bounds_equal_transformers(reference_image_processor):
  images = [noise_image(400, 300, seed=4), noise_image(33, 17, seed=5)]
  bounds = {"min_pixels": 28 * 28 * 16, "max_pixels": 28 * 28 * 64}
  expected = reference_image_processor.Qwen2VLImageProcessorPil(**bounds)(images=images,
                                                                          return_tensors="np")
  got = qwen.preprocess_images(images, qwen.QwenImageConfig(**bounds))
  np.testing.assert_array_equal(got["image_grid_thw"], expected["image_grid_thw"])
  np.testing.assert_array_equal(got["pixel_values"], expected["pixel_values"])


def test_image_config_reads_old_and_new_preprocessor_configs(reference_image_processor):
  written = reference_image_processor.Qwen2VLImageProcessorPil(min_pixels=1000, max_pixels=90000)
  new_style = json.loads(written.to_json_string())  # size: {shortest_edge, longest_edge}
  assert "size" in new_style
  config = qwen.QwenImageConfig.from_preprocessor_config(new_style)
  assert (config.min_pixels, config.max_pixels) == (1000, 90000)
  assert config == qwen.QwenImageConfig(min_pixels=1000, max_pixels=90000)
  old_style = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
               "temporal_patch_size": 2, "merge_size": 2,
               "image_mean": list(qwen.OPENAI_CLIP_MEAN), "image_std": list(qwen.OPENAI_CLIP_STD),
               "image_processor_type": "Qwen2VLImageProcessor"}
  config = qwen.QwenImageConfig.from_preprocessor_config(old_style)
  assert (config.min_pixels, config.max_pixels) == (3136, 12845056)
  assert qwen.QwenImageConfig.from_preprocessor_config({}) == qwen.QwenImageConfig()
  with pytest.raises(ValueError, match="do_normalize=false"):
    qwen.QwenImageConfig.from_preprocessor_config({"do_normalize": False})


# --- tokens with the real Qwen vocabulary ---------------------------------------------------

def test_special_token_ids_come_from_the_vocabulary(processor):
  ids = processor.token_ids
  assert (ids.vision_start_id, ids.image_pad_id, ids.vision_end_id, ids.im_end_id) == (
      151652, 151655, 151653, 151645)
  assert ids.pad_id == 151643 and ids.eos_ids == (151645, 151643)


def expected_ids(hf_tokenizer, messages, grids, add_generation_prompt=True):
  """Ids from transformers: the official template, then pads expanded as its processor does."""
  text = hf_tokenizer.apply_chat_template(messages, chat_template=QWEN25_VL_CHAT_TEMPLATE,
                                          tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
  pieces = text.split("<|image_pad|>")
  assert len(pieces) == len(grids) + 1
  text = pieces[0] + "".join("<|image_pad|>" * (int(np.prod(g)) // 4) + piece
                             for g, piece in zip(grids, pieces[1:]))
  return hf_tokenizer(text)["input_ids"]


def test_image_and_text_prompt_ids_equal_transformers(processor, hf_tokenizer):
  image = noise_image(57, 131)
  prompt = "Describe this image.  Be precise:\n list 3 objects, colours & 'shapes'."
  out = processor([prompt], [image])
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
  expected = expected_ids(hf_tokenizer, messages, out["image_grid_thw"])
  assert out["input_ids"][0].tolist() == expected
  assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
  assert (out["input_ids"] == processor.token_ids.image_pad_id).sum() == 2 * 5  # 56x140 px


def test_two_images_and_custom_system_prompt_ids_equal_transformers(hf_tokenizer):
  custom = qwen.QwenProcessor.from_pretrained(QWEN_TOKENIZER_DIR, system_prompt="Be brief.")
  images = [noise_image(100, 60, seed=1), noise_image(30, 200, seed=2)]
  out = custom(["Compare them."], [images])
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                           {"type": "text", "text": "Compare them."}]}]
  assert out["input_ids"][0].tolist() == expected_ids(hf_tokenizer, messages,
                                                      out["image_grid_thw"])


@pytest.mark.parametrize("prompt", ["Describe this image.", "\n\nleading newlines", " space"])
def test_text_only_prompt_ids_equal_transformers(processor, hf_tokenizer, prompt):
  out = processor([prompt])
  assert set(out) == {"input_ids", "attention_mask"}
  messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
  assert out["input_ids"][0].tolist() == expected_ids(hf_tokenizer, messages, [])


def test_response_is_appended_with_im_end_and_masked(processor, hf_tokenizer):
  caption = "A red circle above two blue squares."
  out = processor(["Describe."], [noise_image(56, 56)], responses=[caption])
  messages = [{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": "Describe."}]},
              {"role": "assistant", "content": caption}]
  # The template closes the assistant turn with "<|im_end|>\n"; generation stops at <|im_end|>.
  expected = expected_ids(hf_tokenizer, messages, out["image_grid_thw"], False)
  assert hf_tokenizer.decode(expected[-1:]) == "\n"
  assert out["input_ids"][0].tolist() == expected[:-1]
  response_ids = out["input_ids"][0][out["response_mask"][0]]
  assert processor.decode(response_ids, skip_special_tokens=False) == caption + "<|im_end|>"
  prompt_only = processor(["Describe."], [noise_image(56, 56)])["input_ids"][0]
  np.testing.assert_array_equal(out["input_ids"][0][~out["response_mask"][0]], prompt_only)


# --- batches ----------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_pads_on_the_chosen_side(processor, side):
  images = [noise_image(56, 56, seed=1), noise_image(112, 224, seed=2)]
  out = processor(["Describe this image.", "What is here?"], images, padding_side=side)
  singles = [processor([p], [im])["input_ids"][0] for p, im in
             zip(["Describe this image.", "What is here?"], images)]
  lengths = [len(s) for s in singles]
  assert out["input_ids"].shape == (2, max(lengths))
  for row, single, length in zip(range(2), singles, lengths):
    kept = slice(max(lengths) - length, None) if side == "left" else slice(0, length)
    padded = np.ones(max(lengths), bool)
    padded[kept] = False
    np.testing.assert_array_equal(out["input_ids"][row][kept], single)
    assert (out["input_ids"][row][padded] == processor.token_ids.pad_id).all()
    np.testing.assert_array_equal(out["attention_mask"][row], ~padded)
  # Images of all prompts, in prompt order.
  np.testing.assert_array_equal(out["image_grid_thw"], [[1, 4, 4], [1, 16, 8]])
  assert out["pixel_values"].shape == (16 + 128, 3 * 2 * 14 * 14)
  assert processor.batch_decode(out["input_ids"]) == [
      "system\nYou are a helpful assistant.\nuser\nDescribe this image.\nassistant\n",
      "system\nYou are a helpful assistant.\nuser\nWhat is here?\nassistant\n"]


def test_caption_round_trips_and_decode_skips_special_tokens(processor):
  caption = "Two small, blue squares — and a café sign (ünïcode) at 3:45pm!"
  ids = processor.tokenizer.encode(caption, add_special_tokens=False).ids
  generated = np.array(ids + [processor.token_ids.im_end_id, processor.token_ids.pad_id])
  assert processor.decode(generated) == caption
  assert processor.batch_decode(generated[None]) == [caption]


# --- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, message", [
    (lambda p: p(["a", "b"], [None]), ValueError,
     r"prompts and images have different lengths \(2 vs 1\)"),
    (lambda p: p(["a"], responses=["x", "y"]), ValueError,
     r"prompts and responses have different lengths \(1 vs 2\)"),
    (lambda p: p(["a", "b", "c", "d"], [None, None, None, noise_image(10, 2010)]), ValueError,
     r"images\[3\]: a 10x2010 px image \(width x height\) has aspect ratio 201, over 200"),
    (lambda p: p(["a", "b"], [None, "cat.jpg"]), TypeError, r"images\[1\] is a str"),
    (lambda p: p(["a"], [[noise_image(28, 28), None]]), TypeError,
     r"images\[0\]\[1\] is a NoneType"),
    (lambda p: p("a cat"), TypeError, "prompts must be a non-empty list of str"),
    (lambda p: p([]), TypeError, "prompts must be a non-empty list of str"),
    (lambda p: p(["ok", 3]), TypeError, r"prompts\[1\] is a int"),
    (lambda p: p(["<|image_pad|> here"]), ValueError,
     r"prompts\[0\] contains the special token '<\|image_pad\|>'"),
    (lambda p: p(["a"], responses=["done<|im_end|>"]), ValueError,
     r"responses\[0\] contains the special token '<\|im_end\|>'"),
    (lambda p: p(["a"], padding_side="middle"), ValueError, "padding_side must be"),
])
def test_bad_input_is_named(processor, call, error, message):
  with pytest.raises(error, match=message):
    call(processor)


def test_from_pretrained_reads_preprocessor_config(tmp_path):
  shutil.copy(os.path.join(QWEN_TOKENIZER_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 8}}))
  loaded = qwen.QwenProcessor.from_pretrained(str(tmp_path))
  assert (loaded.image_config.min_pixels, loaded.image_config.max_pixels) == (3136, 6272)
  out = loaded(["a"], [noise_image(1000, 1000)])
  np.testing.assert_array_equal(out["image_grid_thw"], [[1, 4, 4]])
