"""The benchmark loaders on fixtures of each published layout, and their errors."""

import json
import os

import pytest

from balcap.evals import benchmark_data
from evals import benchmark_fixtures


def test_each_layout_loads(tmp_path):
  decap = benchmark_data.load_decapbench(benchmark_fixtures.decapbench(str(tmp_path / "d")))
  assert [d.id for d in decap] == ["dc0.jpg", "dc1.jpg"]
  assert decap[0].oracle_facts == ("a red cube 0", "a blue ball", "a wooden table")
  assert os.path.isfile(decap[1].image_path)
  qa = benchmark_data.load_captionqa(benchmark_fixtures.captionqa(str(tmp_path / "q")))
  assert [(q.id, q.domain, len(q.questions)) for q in qa] == [("nat_000", "natural", 3),
                                                             ("nat_001", "document", 3)]
  assert qa[0].questions[2].id == "nat_000/2" and qa[0].questions[2].answer == "2"
  arena = benchmark_data.load_caparena(benchmark_fixtures.caparena(str(tmp_path / "a")))
  assert [(a.baseline, a.baseline_caption) for a in arena] == [
      ("gpt", "gpt caption 0"), ("cog", "cog caption 1"), ("cpm", "cpm caption 2")]


def test_a_missing_folder_names_it_and_the_layout(tmp_path):
  with pytest.raises(benchmark_data.BenchmarkDataError,
                     match=r"(?s)DeCapBench: .*does not exist.*oracle_facts"):
    benchmark_data.load_decapbench(str(tmp_path / "nowhere"))


def test_a_bad_record_names_the_file_line_and_field(tmp_path):
  folder = benchmark_fixtures.decapbench(str(tmp_path / "d"))
  path = os.path.join(folder, "human_annotated_oracle_facts.jsonl")
  with open(path, "a") as f:
    f.write(json.dumps({"image_name": "dc0b.jpg", "oracle_caption": "x"}) + "\n")
  with pytest.raises(benchmark_data.BenchmarkDataError,
                     match=r"line 3: has no field 'oracle_facts'"):
    benchmark_data.load_decapbench(folder)


def test_a_missing_image_and_a_foreign_answer_are_errors(tmp_path):
  folder = benchmark_fixtures.caparena(str(tmp_path / "a"))
  os.remove(os.path.join(folder, "images", "ca1.jpg"))
  with pytest.raises(benchmark_data.BenchmarkDataError, match=r"image 'ca1.jpg'.*does not exist"):
    benchmark_data.load_caparena(folder)
  folder = benchmark_fixtures.captionqa(str(tmp_path / "q"))
  path = os.path.join(folder, "natural.jsonl")
  rows = [json.loads(line) for line in open(path)]
  rows[1]["questions"][0]["answer"] = "Purple"
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with pytest.raises(benchmark_data.BenchmarkDataError,
                     match=r"line 2 question 0: answer 'Purple' is not one of"):
    benchmark_data.load_captionqa(folder)
