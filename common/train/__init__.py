"""Training: the CPS engine both stages share, the CPS step, losses, distributed helpers.

Imports common.core, common.volume, common.networks, common.storage and common.evaluation.
"""
