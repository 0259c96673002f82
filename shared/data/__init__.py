"""Dataset readers, synthetic data, client partitions and tokenizers (numpy only)."""

from shared.data.errors import DataError
from shared.data.partition import dirichlet, iid, natural, shards
from shared.data.readers import (
    Splits,
    TextRecords,
    char_windows,
    read_csv,
    read_idx,
    read_idx_dir,
    read_jsonl,
    read_leaf_json,
    read_npz,
    read_shakespeare,
)
from shared.data.synthetic import synthetic_device, synthetic_sizes
from shared.data.text import CharVocab, WordTokenizer, tokenize

__all__ = [
    "CharVocab",
    "DataError",
    "Splits",
    "TextRecords",
    "WordTokenizer",
    "char_windows",
    "dirichlet",
    "iid",
    "natural",
    "read_csv",
    "read_idx",
    "read_idx_dir",
    "read_jsonl",
    "read_leaf_json",
    "read_npz",
    "read_shakespeare",
    "shards",
    "synthetic_device",
    "synthetic_sizes",
    "tokenize",
]
