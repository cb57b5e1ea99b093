"""Baselines compared against MoL+MSM on the same frozen backbone.

``text_policy``: VLM2VLA-style actions written as text, LoRA-only fine-tuning, greedy decoding.
``probe``: a text-only next-token probe showing which training paths change the backbone.
"""
