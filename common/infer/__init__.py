"""Inference: the two-stage predictor, label upsampling, post-processing, backends, the folder loop, overlays.

Imports common.core, common.volume, common.networks, common.storage and common.evaluation (never common.train).
"""
