"""Config files, `file.py:key=val` arguments and validate()'s errors."""

import pytest
from ml_collections.config_flags import config_path

from balcap import configs
from balcap.models import policy
from balcap.models.llava import LlavaConfig
from testlib import load_config_file


def problems_of(config, num_devices=8, process_count=1):
  with pytest.raises(configs.ConfigError) as info:
    configs.validate(config, num_devices=num_devices, process_count=process_count)
  return info.value.problems


def test_parse_arg_types_values_by_their_defaults():
  arg = configs.parse_arg("mode=eval,steps=10,lr=1,name=gs://bucket/x", mode="train", steps=100,
                          lr=0.5, name="")
  assert arg.mode == "eval" and arg.steps == 10 and arg.name == "gs://bucket/x"
  assert arg.lr == 1.0 and isinstance(arg.lr, float)
  assert configs.parse_arg(None, mode="train").mode == "train"


def test_parse_arg_rejects_unknown_keys_and_wrong_types():
  with pytest.raises(configs.ConfigError, match="unknown config argument 'mdoe'"):
    configs.parse_arg("mdoe=eval", mode="train")
  with pytest.raises(configs.ConfigError, match="steps='ten' is str, expected int"):
    configs.parse_arg("steps=ten", steps=100)
  with pytest.raises(configs.ConfigError, match="not key=value"):
    configs.parse_arg("eval", mode="train")


def test_tiny_config_validates_and_takes_its_mode_argument():
  config = load_config_file("tiny")
  configs.validate(config, num_devices=8)
  assert config.mode == "train"
  assert load_config_file("tiny", "mode=data").mode == "data"


def test_unknown_key_is_named_with_a_suggestion():
  config = load_config_file("tiny")
  config.unlock()
  config.data.capworld.num_trian = 5
  (problem,) = problems_of(config)
  assert "config.data.capworld.num_trian is not an option" in problem
  assert "did you mean config.data.capworld.num_train" in problem


def test_wrong_type_is_named_with_the_expected_type():
  config = load_config_file("tiny")
  config.unlock()
  del config["batch_size"]
  config.batch_size = "64"
  (problem,) = problems_of(config)
  assert "config.batch_size='64' has type str; expected int" in problem


def test_mesh_that_does_not_divide_the_devices_is_rejected():
  config = load_config_file("tiny")
  config.mesh.tensor = 3
  (problem,) = problems_of(config)
  assert "config.mesh" in problem and "does not divide the 8 devices" in problem
  config.mesh.tensor, config.mesh.data = 2, 2
  (problem,) = problems_of(config)
  assert "has 4 devices but there are 8" in problem


def test_batch_that_does_not_divide_over_data_shards_is_rejected():
  config = load_config_file("tiny")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  config.batch_size = 6
  (problem,) = problems_of(config)
  assert "config.batch_size=6 does not divide over the 4 data shards" in problem
  assert "e.g. 8" in problem
  config.batch_size = 4
  configs.validate(config, num_devices=8)
  assert any("over the 3 hosts" in p for p in problems_of(config, process_count=3))


def test_every_problem_is_reported_in_one_error():
  config = load_config_file("tiny")
  config.mode = "fly"
  config.batch_size = 7
  config.data.capworld.image_sizes = ((224, 100),)
  config.data.name = "caption_folder"
  config.checkpoint.keep = 0
  problems = problems_of(config)
  assert len(problems) == 5, problems
  text = "\n".join(problems)
  for field in ("config.mode='fly'", "config.batch_size=7", "image_sizes",
                "caption_folder.manifest is empty", "config.checkpoint.keep=0"):
    assert field in text


def test_sft_settings_are_checked_only_where_sft_runs():
  config = load_config_file("tiny")  # SFT on sft_caption, which only CapWorld has
  config.data.name = "caption_folder"
  config.data.caption_folder.manifest = __file__  # exists; its content is not read here
  assert any("sft_caption' exists only in CapWorld" in p for p in problems_of(config))
  config.mode = "data"
  configs.validate(config, num_devices=8)


def test_model_configs_validate_on_their_hardware(monkeypatch):
  assert load_config_file("qwen7b", "hardware=tpu").mesh.fsdp == -1
  for name in ("qwen3b", "qwen7b", "llava7b"):
    config = load_config_file(name, "hardware=gpu8")
    with pytest.raises(configs.ConfigError, match="needs config.rewards.openai.base_url"):
      configs.validate(config, num_devices=8)  # a real run must name its judge
    config.rewards.openai.base_url, config.rewards.openai.model = "http://judge:8000", "judge"
    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    with pytest.raises(configs.ConfigError, match="JUDGE_API_KEY .* is not set"):
      configs.validate(config, num_devices=8)  # found before SFT, not after
    monkeypatch.setenv("JUDGE_API_KEY", "secret")
    configs.validate(config, num_devices=8)
  with pytest.raises(configs.ConfigError, match="hardware='pod' is not one of"):
    load_config_file("qwen7b", "hardware=pod")


def test_architecture_errors_name_the_field():
  config = load_config_file("tiny")
  config.model.architecture.text.num_heads = 5
  (problem,) = problems_of(config)
  assert problem.startswith("config.model.architecture: ") and "num_heads 5" in problem
  config = load_config_file("tiny")
  config.model.architecture.vision.unlock()
  config.model.architecture.vision.windows = 3
  (problem,) = problems_of(config)
  assert "vision.windows is not a field of QwenVisionConfig" in problem
  config = load_config_file("tiny")
  config.model.architecture = {}
  (problem,) = problems_of(config)
  assert "neither checkpoint nor architecture is set" in problem


@pytest.mark.parametrize("name", ["tiny", "qwen3b", "qwen7b", "llava7b"])
def test_every_architecture_field_can_be_set_on_the_command_line(name):
  """ml_collections overrides only fields a config has: the shipped configs carry them all."""
  config = load_config_file(name)
  # What `--config.model.architecture.text.rope_theta=100.0` runs.
  config_path.set_value("model.architecture.text.rope_theta", config, 100.0)
  config_path.set_value("model.architecture.text.rms_norm_eps", config, 1e-5)
  text = policy.architecture_from_config(config.model).text
  assert (text.rope_theta, text.rms_norm_eps) == (100.0, 1e-5)


def test_a_full_architecture_is_the_same_model():
  qwen = {"family": "qwen2_5_vl",
          "text": dict(vocab_size=896, hidden_size=128, intermediate_size=384, num_layers=4,
                       num_heads=4, num_kv_heads=2, mrope_section=(4, 6, 6)),
          "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                         out_hidden_size=128, fullatt_block_indexes=(1,))}
  llava = {"family": "llava",  # its text section in llama_lm.llama_config's arguments
           "text": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=4),
           "vision": dict(image_size=28, patch_size=14, hidden_size=16, intermediate_size=32,
                          num_layers=2, num_heads=2, feature_layer=-2),
           "image_token_id": 60, "pad_token_id": 61}
  for partial in (qwen, llava):
    full = configs.full_architecture(partial)
    assert "rope_theta" in full["text"] and "rms_norm_eps" in full["text"]
    family = policy.family_of(partial["family"]).config_class
    assert family.from_dict(full) == family.from_dict(partial)
  assert isinstance(family.from_dict(full), LlavaConfig)


def test_reward_and_advantage_settings_are_checked():
  config = load_config_file("tiny")
  config.rewards.judge = "openai"
  config.advantage.weights = (1.0, 1.0)
  problems = problems_of(config)
  assert any("needs config.rewards.openai.base_url" in p for p in problems)
  assert any(p.startswith("config.advantage: ") and "2 weights for 3 components" in p
             for p in problems)


def test_eval_and_export_settings_are_checked(tmp_path):
  config = load_config_file("eval", "model=tiny")
  config.eval.benchmarks = ("dcscore", "bleu")
  config.eval.stage, config.eval.judge.image_detail, config.eval.judge.tries = "best", "max", 0
  with pytest.raises(configs.ConfigError) as error:
    configs.validate(config, num_devices=1)
  message = str(error.value)
  for expected in ("config.eval.benchmarks=('dcscore', 'bleu'): choose from",
                   "config.eval.stage='best'", "config.eval.judge.image_detail='max'",
                   "config.eval.judge.tries=0", "mode eval needs captions to score",
                   "config.eval.decapbench is empty"):
    assert expected in message, expected
  config = load_config_file("eval", "model=tiny")
  config.eval.benchmarks = ("classic",)
  config.eval.run, config.eval.captions = str(tmp_path), str(tmp_path / "none.jsonl")
  with pytest.raises(configs.ConfigError, match="are both set") as error:
    configs.validate(config, num_devices=1)
  assert "none.jsonl': no such file" in str(error.value)
  config.eval.captions = ""
  configs.validate(config, num_devices=1)  # a run's checkpoints carry the model
  config = load_config_file("tiny", "mode=export")
  config.export.dtype, config.export.stage = "int8", "final"
  with pytest.raises(configs.ConfigError) as error:
    configs.validate(config, num_devices=1)
  assert "config.export.dtype='int8'" in str(error.value)
  assert "config.export.stage='final'" in str(error.value)


def test_a_bad_capworld_terse_share_is_named():
  config = load_config_file("tiny")
  config.data.capworld.terse_share = 1.5
  (problem,) = problems_of(config)
  assert problem.startswith("config.data.capworld:") and "terse_share=1.5" in problem, problem
