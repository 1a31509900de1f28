"""Core: the label table and label rule, default settings, errors, logging, atomic files, device, AMP, typed config.

Imports nothing else of the project.
"""
