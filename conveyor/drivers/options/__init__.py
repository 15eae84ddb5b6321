"""Drivers' option records, one client-free module per driver.

Each module declares the fields its driver accepts — on the driver entry, in a
queue's ``driver_options.<name>`` and (if any) in a consumer's — with their
converters and defaults, and exports them as ``SCHEMA``. The loader reads every
driver's records from here without importing any driver or client library; the
driver reads its typed record at run time. See docs/adding-a-driver.md.
"""
