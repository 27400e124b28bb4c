"""Quality, memory and speed measurements for converted checkpoints, and the real text they use.

Kept apart from the converter so a benchmark can score any transformers causal LM the same way.
"""
