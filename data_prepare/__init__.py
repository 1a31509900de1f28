"""Data preparation: reading the dataset tree, resampling, LMDB databases, and a synthetic phantom generator."""
