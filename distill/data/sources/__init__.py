"""Sources: a config's `SourceConfig` resolved to files or a stream, read document by document with a
policy for bad records (`records.py`, `readers.py`, `resolve.py`)."""
