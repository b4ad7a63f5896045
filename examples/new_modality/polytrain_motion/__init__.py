"""polytrain-motion: wrist accelerometer recordings as a polytrain modality.

- ``tokenizer.MotionTokenizer``: a (time, axes) recording -> patches of ``patch_samples`` time steps;
- ``embedder.MotionEmbedder``: patches -> model vectors, with learned time positions;
- ``data.air_digits``: a synthetic air-writing dataset, digits written in the air -> their word
  (``builtin:air_digits/<split>``).

polytrain finds all three through the entry points in pyproject.toml.
"""
