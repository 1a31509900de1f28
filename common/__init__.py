"""Shared library of SemiSeg-CSSN: I/O, preprocessing, networks, losses, CPS/UIF, metrics, training engine."""
