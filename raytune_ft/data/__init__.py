"""Data pipeline: readers, curation, split, tokenisation and the prepared-data store."""

from raytune_ft.data.pipeline import PreparedData, data_dir_for, prepare_data, task_experiment
from raytune_ft.data.readers import DataError, Records, read_records
from raytune_ft.data.store import load_split, load_test_split, reads_of_test_split

__all__ = [
    "DataError",
    "PreparedData",
    "Records",
    "data_dir_for",
    "task_experiment",
    "load_split",
    "load_test_split",
    "prepare_data",
    "read_records",
    "reads_of_test_split",
]
