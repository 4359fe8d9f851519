"""TPU VM pod launches: `python -m balcap.launch` (see __main__.py and the README, "On a TPU
pod"). `slices` names slices, `source` packs the code to install, `gcloud` builds and runs the
commands."""
