"""Judging what was trained: test metrics, per-image predictions and the confusion
matrix (`evaluation`), the audit of the data (near-duplicates, label conflicts, likely label
errors: `audit`), what changed between two runs (`changes`) and the comparison of backbones
with its rule (`compare`). Imports the wings below it (core to probe).
"""
