"""Volumes as (z, y, x) arrays: HU intensities, resizing, boxes and crops, the network input layer.

Imports common.core only.
"""
