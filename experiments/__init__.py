"""Paper-table analogs: each module trains and evaluates a set of variants over seeds and writes a
table. Run from the repository root: ``python -m experiments.<name> --workdir=DIR``."""
