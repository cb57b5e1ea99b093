"""``m2vla bench``: where the time goes, side by side with the alternatives.

Sections (each a module with ``run(settings, ...) -> dict``): ``head`` (MoL+MSM step, torch vs
onnxruntime), ``backbone`` (per-frame features with / without each optimisation),
``vs_text_actions`` (one chunk vs the same chunk decoded as text tokens on the same backbone),
``ros`` (camera / instruction -> first command and the controller's command timing, across
real processes), ``scaling`` (head latency vs its sizes; feature message bytes vs backbone
size) and ``gpu`` (skipped without CUDA). Every numeric JSON key names its unit
(``schema.UNIT_SUFFIXES``); ratios start with ``speedup_``.
"""
