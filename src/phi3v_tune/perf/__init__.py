"""Throughput tooling: the FLOP formula for model FLOPs utilisation and the training benchmark."""
