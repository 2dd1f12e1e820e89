"""CAIT: asymmetric token merging (ATME) and consistent dynamic channel pruning (CDCP), arXiv 2309.15755; our reading of it is in docs/methods-cait.md."""
