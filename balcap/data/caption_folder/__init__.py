"""Your own images and reference captions, listed in a JSONL manifest, as a TFDS data set."""
