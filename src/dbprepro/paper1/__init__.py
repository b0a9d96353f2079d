"""Paper 1 (Liu et al., ICLR 2025, arXiv 2404.14309): its tables, loss landscapes and figures."""
