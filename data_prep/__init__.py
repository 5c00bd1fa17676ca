"""Data preparation: MMSA pickles or users' own features -> checksummed Arrow shards.

Needs numpy, pyarrow and fsspec only (no torch), so data can be prepared on any machine.
"""
