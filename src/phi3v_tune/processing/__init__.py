"""Inputs of the model: image geometry and pixels, the prompt format and tokenizer, where model files are."""
