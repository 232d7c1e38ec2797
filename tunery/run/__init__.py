"""A training run as one unit: its config (config.py), its set-up and finish around a recipe's loop
(lifecycle.py), and the files it leaves in its run directory (files.py)."""
