"""`distillery report`: plots and a summary of a run (see `build.py`)."""
