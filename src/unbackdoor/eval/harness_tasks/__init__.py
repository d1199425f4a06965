"""lm-evaluation-harness tasks shipped with the package: point lm-eval's ``include_path`` at this folder.

``unbackdoor_mc``: general-knowledge multiple choice over ``unbackdoor_mc.jsonl`` (loaded by
:func:`mc_data.load`), offline.
"""
