"""Model-specific preprocessing in numpy: chat rendering, tokenization, image patches."""
