"""The model: Phi3VConfig, Phi3VForCausalLM (transformers' Phi-3 + CLIP), loss, loading and saving folders."""
