"""Evaluation: FLARE22 DSC/NSD (official rules), surface distance, the UIF uncertainty scores and selection.

Imports common.core, common.volume and common.storage.
"""
