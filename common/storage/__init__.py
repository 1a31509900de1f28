"""Files on disk: CT images, LMDB records, data paths, step markers, checkpoints, model folders, original weights.

Imports common.core, common.volume and common.networks.
"""
