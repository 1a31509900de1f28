"""Data preparation: reading the dataset tree, resampling, LMDB databases, and a synthetic phantom generator."""

FOLD1_VAL_LIST = "fold1_val_series_uids.txt"
"""Optional file in a dataset's file_list/ folder: the labeled cases that validate fold 1, one id a line. data_prepare
uses exactly them instead of the val_ratio draw; `data_prepare.synthetic --fold1-val N` writes it."""
