"""The rank-side scripts of the distributed tests: each runs under torchrun (`run_ranks` in
tests/distributed/__init__.py), checks many cases in one launch and ends with `report`."""
