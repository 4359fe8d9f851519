"""The installed environment is the one the README promises."""

import os
import subprocess
import sys

from testlib import QWEN_TOKENIZER_DIR, REPO


def test_parity_dependencies_are_installed_exactly():
  # Parity tests against transformers need these; without them they must fail, never skip.
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  assert torch.__version__.split("+")[0] == "2.13.0"
  assert transformers.__version__ == "5.24.0"
  assert os.path.isfile(os.path.join(QWEN_TOKENIZER_DIR, "tokenizer.json"))


def test_the_demo_path_never_imports_torch():
  code = ("import sys; import balcap.main, balcap.train, balcap.data.report, "
          "balcap.data.datasets, balcap.data.capworld.builder, "
          "balcap.data.caption_folder.builder; "
          "assert 'torch' not in sys.modules, 'torch imported'")
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
