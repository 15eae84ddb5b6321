"""A toy driver added the way docs/adding-a-driver.md says, to prove that the seam needs
nothing else: its options module, its driver module, one row in the kind table (the
test adds it), its tests (``tests/test_driver_seam.py``)."""
