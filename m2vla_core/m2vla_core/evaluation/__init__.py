"""Closed-loop evaluation of policies in the PyBullet task suite, and the ablation table."""
