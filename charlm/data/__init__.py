"""The data: named corpora, finding and checking a text, bytes and UTF-8, splits and batches.

Importing this package imports no torch (charlm.config reads charlm.data.corpora's table).
"""
