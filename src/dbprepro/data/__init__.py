"""Data sets and fixed, hashed splits.

* :mod:`.split`: a split stored as one ``.npz`` per part with the sha256 of each file in a JSON
  manifest (:func:`prepare_split`, :func:`write_split`), read back hash-checked by
  :func:`load_split`, and cut into fixed batches and shards (:func:`batches`, :func:`shard_slices`).
* :mod:`.digits`: scikit-learn's handwritten digits, the embedded default data set.
* :mod:`.cifar10`: CIFAR-10 from the parquet files of the Hugging Face dataset ``uoft-cs/cifar10``
  (imported on demand: it is not loaded by ``import dbprepro.data``).

``sha256_file`` lives in :mod:`dbprepro.io` and is re-exported here for old callers.
"""

from ..io import sha256_file
from .digits import load_digits_arrays, make_digits_split
from .split import DATASETS, Split, batches, load_split, prepare_split, shard_slices, write_split

__all__ = ["DATASETS", "Split", "batches", "load_digits_arrays", "load_split", "make_digits_split", "prepare_split",
           "sha256_file", "shard_slices", "write_split"]
