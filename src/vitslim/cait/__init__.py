"""CAIT: asymmetric token merging (ATME) and consistent dynamic channel pruning (CDCP), arXiv 2309.15755; see DESIGN.md §1.2."""
