"""Data sets (TFDS builders written as array_record) and the input pipeline built on them."""
