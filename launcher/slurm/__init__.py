"""Slurm campaigns: job plan (`jobs.py`), sbatch scripts (`render.py`), submit/status/cancel (`submit.py`)."""
