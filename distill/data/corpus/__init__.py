"""The demo corpus: real multi-domain text from files every Debian machine has (`build.py`), each file's
text extracted (`text.py`)."""
