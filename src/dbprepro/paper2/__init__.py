"""Paper 2 (Liu & Wei 2025, arXiv 2505.22839): distances, randomness dominance, fixed randomness
and compression, each analysis with its table and figure."""
