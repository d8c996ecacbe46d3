"""FID and Inception Score on video frames (Inception-v3, `inception.py`).

Every frame of every clip is one image (optionally only every `frame_stride`-th
frame). FID is the Frechet distance (`fvd.frechet_distance`, unbiased covariances)
of the 2048-d pool3 features of real and generated frames. IS is the image Inception
Score of the generated frames, exp(E_x KL(p(y|x) || p(y))), averaged over `splits`
equal splits as Salimans et al.; it is NOT the video IS of TGAN / Video LDM's UCF-101
table, which uses a C3D network trained on UCF-101.

The Inception weights are a user-supplied safetensors file (see `inception.py`);
with random weights the numbers only exercise the code path.
"""

from typing import Iterable

import numpy as np

from videoldm_jax.eval.fvd import FeatureStats, stats_distance
from videoldm_jax.eval.inception import InceptionFeatures

__all__ = ["frames_of", "frame_stats", "inception_score", "fid_from_videos"]


def frames_of(videos_NxTxHxWx3: np.ndarray, frame_stride: int = 1) -> np.ndarray:
  """Video batch (N, T, H, W, 3) -> frames (N * ceil(T / stride), H, W, 3)."""
  v = np.asarray(videos_NxTxHxWx3)
  if v.ndim != 5 or v.shape[-1] != 3:
    # An image batch (N, H, W, 3) was strided over H and read as frames of W rows.
    raise ValueError(f"expected videos (N, T, H, W, 3), got shape {v.shape}; for images "
                     "add a time axis: x[:, None]")
  if int(frame_stride) < 1:
    raise ValueError(f"frame_stride={frame_stride}: expected >= 1")
  v = v[:, ::frame_stride]
  return v.reshape(-1, *v.shape[2:])


def frame_stats(extractor: InceptionFeatures,
                video_chunks: Iterable[np.ndarray], frame_stride: int = 1,
                keep_logits: bool = False, show_progress: bool = False
                ) -> tuple[FeatureStats, np.ndarray | None]:
  """pool3 statistics (and optionally all logits, (M, K), for IS) of the frames of
  video chunks, each (n, T, H, W, 3); only the logits grow with the number of frames.
  The logits leave out the classifier's bias, as the Inception Score's definition
  (improved-GAN) and torch-fidelity / torchmetrics do."""
  stats, logits = None, []
  for chunk in video_chunks:
    for pool_bxF, logits_bxK in extractor.iterate(frames_of(chunk, frame_stride),
                                                  show_progress):
      stats = stats or FeatureStats(pool_bxF.shape[-1])
      stats.update(pool_bxF)
      if keep_logits:
        logits.append(logits_bxK - extractor.fc_bias)
  if stats is None:
    raise ValueError("no frames given")
  return stats, (np.concatenate(logits, axis=0) if keep_logits else None)


# The split shuffle's seed (torch-fidelity's default seed is 2020 too; its permutation
# comes from torch's generator, so the splits are not the same rows).
IS_SHUFFLE_SEED = 2020


def inception_score(logits_NxK: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Inception Score (mean, std over `splits`) from classifier logits (N, K).

  Per split: exp(mean_x KL(p(y|x) || mean_x p(y|x))), in float64 with log-softmax.
  N must be at least `splits`. The rows are shuffled by a fixed permutation (seed
  IS_SHUFFLE_SEED) before np.array_split (the first N % splits splits one item
  longer), as torch-fidelity and torchmetrics shuffle: video frames arrive clip by
  clip, and consecutive splits of a few clips' near-identical frames each collapse the
  marginal p(y) onto p(y|x) and depend on the order of the files (50 clips of one
  certain class each, 16 frames, 10 splits: 5.0 in order against 35.8 shuffled).
  """
  logits = np.asarray(logits_NxK, np.float64)
  if logits.ndim != 2 or logits.shape[0] < splits or splits < 1:
    raise ValueError(f"need logits (N >= splits={splits}, K), got {logits.shape}")
  logits = logits[np.random.default_rng(IS_SHUFFLE_SEED).permutation(logits.shape[0])]
  logp = logits - logits.max(axis=1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(logp, splits):
    p = np.exp(part)
    # p = 0 where a logit trails by > ~745 (in every row: log p(y) = -inf): its term
    # is 0 (x log x -> 0), not 0 * inf.
    with np.errstate(divide="ignore", invalid="ignore"):
      log_py = np.log(p.mean(axis=0))
      kl = np.where(p > 0, p * (part - log_py), 0.0).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def fid_from_videos(real_NxTxHxWx3: np.ndarray, fake_MxTxHxWx3: np.ndarray,
                    weights_path: str, batch_size: int = 64, frame_stride: int = 1,
                    splits: int = 10, extractor: InceptionFeatures | None = None
                    ) -> dict[str, float]:
  """{'fid', 'is', 'is_std'} of two video sets (uint8 or float in [-1, 1]).

  FID compares the frames of both sets; IS is computed on the fake frames.
  """
  extractor = extractor or InceptionFeatures(weights_path, batch_size)
  real, _ = frame_stats(extractor, [real_NxTxHxWx3], frame_stride)
  fake, logits = frame_stats(extractor, [fake_MxTxHxWx3], frame_stride, keep_logits=True)
  is_mean, is_std = inception_score(logits, min(splits, logits.shape[0]))
  return {"fid": stats_distance(real, fake), "is": is_mean, "is_std": is_std}
