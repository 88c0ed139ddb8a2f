"""Paper-table analogs: each module trains and evaluates a set of variants over seeds and
writes a table (``python -m mmret.experiments.<name>``)."""
