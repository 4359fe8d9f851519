"""The Colab notebooks: committed without outputs, and executed headless with SMOKE on CPU.

Each notebook runs top to bottom in a real Jupyter kernel (nbclient) with its parameters cell
followed by an injected one (SMOKE, the checkout, a temporary workdir; for the GPU notebook a
local fake judge server as JUDGE_URL), as papermill would inject them.
"""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from rl.fake_chat_server import FakeChatServer
from testlib import REPO

NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))


def test_both_notebooks_exist():
  assert [p.name for p in NOTEBOOKS] == ["balcap_gpu.ipynb", "balcap_tpu.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_carry_no_outputs_and_take_parameters(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for number, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"{path.name} cell {number} holds outputs: clear them before committing "
          "(Edit > Clear all outputs, or `jupyter nbconvert --clear-output --inplace`)")
  assert "widgets" not in notebook.metadata
  parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(parameters) == 1 and "SMOKE = False" in parameters[0].source


def _execute(path, tmp_path, **values):
  notebook = nbformat.read(path, as_version=4)
  at = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
  injected = {"SMOKE": True, "ROOT": str(REPO), "WORKDIR": str(tmp_path / "run"), **values}
  source = "\n".join(f"{k} = {v!r}" for k, v in injected.items())
  # The notebook's subprocesses see one CPU device, as a single-chip runtime would, and write
  # their data sets under the test's folder.
  source += (f"\nimport os\nos.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'"
             f"\nos.environ['TFDS_DATA_DIR'] = {str(tmp_path / 'tfds')!r}")
  notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(source))
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  return "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.outputs)


def test_both_notebooks_run_headless_with_smoke(tmp_path):
  """The TPU notebook, then the GPU one on the same workdir, as a user moving runtimes would:
  its demo cell resumes the finished run instead of training again (and the suite saves the
  time)."""
  text = _execute(REPO / "colab" / "balcap_tpu.ipynb", tmp_path)
  assert "[4/5] RL (c_gdpo, judge capworld): 1/1 steps" in text
  assert "after RL" in text and "b_capscore" in text  # the before/after table, from eval.json
  assert (tmp_path / "run" / "export" / "policy" / "model.safetensors").exists()
  assert '"id": "/tmp/balcap_upload.png"' in text  # the captioned stand-in upload

  with FakeChatServer() as judge:
    text = _execute(REPO / "colab" / "balcap_gpu.ipynb", tmp_path, JUDGE_URL=judge.url,
                    JUDGE_MODEL="fake-judge", RL_STEPS=1)
    asked = judge.count()
  assert "(resumed from step 2)" in text  # the TPU notebook's run, picked up
  assert (tmp_path / "run" / "hub_caption" / "captions.jsonl").exists()
  assert asked > 0  # the RL run's rewards came from the judge at JUDGE_URL
  assert os.path.exists(tmp_path / "run" / "rl_judge" / "rl" / "metrics.jsonl")
  assert "reward/precision/mean" in text
