"""Frechet distances (FVD, FID) and streaming Gaussian statistics of features.

The Frechet distance between Gaussian fits N(mu1, S1), N(mu2, S2) of two feature sets:

  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

Covariance convention: UNBIASED, S = sum (x - mu)(x - mu)^T / (N - 1), as
google-research/frechet_video_distance (tf.contrib.gan's frechet_classifier_distance)
and pytorch-fid (`np.cov`). StyleGAN-V's FVD uses the biased 1 / N; the two differ by
O(D / N) (D = 400 for I3D), so compare FVDs only under the same convention and N.

tr((S1 S2)^{1/2}) is computed as the sum of the singular values of S1^{1/2} S2^{1/2}
(the eigenvalues of S1 S2 are the squared singular values of that product), with the
symmetric square roots from `eigh`. This is real by construction, needs no scipy, and
stays accurate for rank-deficient covariances (N < D: FVD on a few hundred clips),
where scipy.linalg.sqrtm of the non-symmetric S1 S2 returns complex noise.

`FeatureStats` accumulates sum x and sum x x^T in float64 on the host, so memory is
O(D^2) however many samples stream through; float64 keeps the one-pass covariance
(sum x x^T - N mu mu^T) accurate for features with |mean| >> std.
"""

from pathlib import Path
from typing import Iterable, Sequence

import jax
import numpy as np

__all__ = ["FeatureStats", "frechet_distance", "fvd_from_features", "fvd_from_videos"]


class FeatureStats:
  """Streaming mean / covariance of D-dimensional features (float64 on the host)."""

  def __init__(self, dim: int):
    self.dim = int(dim)
    self.count = 0
    self.sum = np.zeros(self.dim, np.float64)
    self.sum_outer = np.zeros((self.dim, self.dim), np.float64)

  @classmethod
  def from_features(cls, features_NxD: np.ndarray) -> "FeatureStats":
    """Statistics of one (N, D) array."""
    features_NxD = np.asarray(features_NxD)
    stats = cls(features_NxD.shape[-1])
    stats.update(features_NxD)
    return stats

  def update(self, features_NxD: np.ndarray) -> "FeatureStats":
    """Adds a batch of features (N, D); returns self."""
    x = np.asarray(features_NxD, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"expected features of shape (N, {self.dim}), got {x.shape}")
    if not np.all(np.isfinite(x)):
      raise ValueError(f"non-finite features in a batch of {x.shape[0]} (NaN / inf from "
                       "the feature network; for I3D, are the clips >= 9 frames?)")
    self.count += x.shape[0]
    self.sum += x.sum(axis=0)
    self.sum_outer += x.T @ x
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Adds another accumulator's samples (e.g. from another host); returns self."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
    self.count += other.count
    self.sum += other.sum
    self.sum_outer += other.sum_outer
    return self

  @property
  def mean(self) -> np.ndarray:
    """(D,) float64 sample mean."""
    if self.count == 0:
      raise ValueError("no samples in FeatureStats")
    return self.sum / self.count

  @property
  def cov(self) -> np.ndarray:
    """(D, D) float64 UNBIASED sample covariance (divides by N - 1); needs N >= 2."""
    if self.count < 2:
      raise ValueError(f"the covariance needs at least 2 samples, have {self.count}")
    mu = self.mean
    cov = (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return (cov + cov.T) / 2  # exact symmetry despite rounding

  def save(self, path: str | Path) -> Path:
    """Writes count, sum and sum_outer to an .npz (no pickle), e.g. to reuse the
    statistics of a real data set across evaluations; returns the file written
    (`path`, with .npz added where it has another suffix, as numpy does)."""
    path = _npz(path)
    np.savez(path, count=np.int64(self.count), sum=self.sum, sum_outer=self.sum_outer)
    return path

  @classmethod
  def load(cls, path: str | Path) -> "FeatureStats":
    """Reads a file written by `save` (given the same `path`)."""
    path = _npz(path)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such statistics file")
    with np.load(path, allow_pickle=False) as f:
      missing = {"count", "sum", "sum_outer"} - set(f.files)
      if missing:
        raise ValueError(f"{path}: not a FeatureStats file (missing {sorted(missing)})")
      count, total, outer = f["count"], f["sum"], f["sum_outer"]
    # (A file of other arrays failed at the first distance, with a numpy shape error.)
    if (count.shape != () or not np.issubdtype(count.dtype, np.integer) or count < 0
        or total.ndim != 1 or outer.shape != total.shape * 2):
      raise ValueError(f"{path}: not a FeatureStats file: expected an integer count >= 0, "
                       f"sum (D,) and sum_outer (D, D), got count {count.dtype}"
                       f"{count.shape}, sum {total.shape}, sum_outer {outer.shape}")
    stats = cls(total.shape[0])
    stats.count = int(count)
    stats.sum, stats.sum_outer = total.astype(np.float64), outer.astype(np.float64)
    return stats


def _npz(path: str | Path) -> Path:
  path = Path(path)
  return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _sqrt_psd(s_DxD: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix; rounding negatives clip to 0."""
  w, v = np.linalg.eigh(s_DxD)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                     cov2: np.ndarray) -> float:
  """Frechet distance of N(mu1, cov1) and N(mu2, cov2): means (D,), covariances (D, D).

  Returns d^2 as in FID / FVD (the squared Wasserstein-2 distance, not its root),
  computed in float64; clipped at 0 against rounding.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  if mu1.ndim != 1 or mu1.shape != mu2.shape or cov1.shape != cov2.shape or \
     cov1.shape != (mu1.shape[0], mu1.shape[0]):
    raise ValueError(f"shapes do not match: mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 "
                     f"{mu2.shape}, cov2 {cov2.shape}")
  tr_sqrt = np.linalg.svd(_sqrt_psd(cov1) @ _sqrt_psd(cov2), compute_uv=False).sum()
  diff = mu1 - mu2
  d2 = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt
  return float(max(d2, 0.0))


def stats_distance(a: FeatureStats, b: FeatureStats) -> float:
  """`frechet_distance` of two accumulators."""
  return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def fvd_from_features(real_NxD: np.ndarray, fake_MxD: np.ndarray) -> float:
  """Frechet distance of two feature arrays (N, D) and (M, D), N, M >= 2."""
  return stats_distance(FeatureStats.from_features(real_NxD),
                        FeatureStats.from_features(fake_MxD))


def video_stats(extractor, videos: np.ndarray | Iterable[np.ndarray],
                show_progress: bool = False) -> FeatureStats:
  """Streams videos through a feature extractor (e.g. `i3d.I3DFeatures`) into stats.

  Args:
    extractor: callable with `.iterate(videos, show_progress)` yielding (b, D) batches.
    videos: one (N, T, H, W, 3) array, or an iterable of such chunks (e.g. read from
      files a chunk at a time, so that no more than a chunk is in memory).
  """
  chunks = [videos] if hasattr(videos, "shape") else videos  # one array, or chunks
  stats = None
  for chunk in chunks:
    for feats in extractor.iterate(np.asarray(chunk), show_progress):
      stats = stats or FeatureStats(feats.shape[-1])
      stats.update(feats)
  if stats is None:
    raise ValueError("no videos given")
  return stats


def fvd_from_videos(real_NxTxHxWx3: np.ndarray, fake_MxTxHxWx3: np.ndarray,
                    batch_size: int = 16, *, num_frames: int = 16,
                    resize: str = "half_pixel", resolution: int = 224,
                    devices: Sequence[jax.Device] | None = None,
                    extractor=None, show_progress: bool = False) -> float:
  """FVD of two video sets (uint8 [0, 255] or float [-1, 1]; any H, W; T >= num_frames).

  Each clip's first `num_frames` frames (16 by default; at least 9, see `i3d.py`) are
  resized to resolution^2 and mapped to Kinetics-400 I3D logits averaged over time;
  the result is the Frechet distance of the two Gaussian fits (unbiased covariances).

  Args:
    real_NxTxHxWx3, fake_MxTxHxWx3: the two sets; N, M >= 2 (a few hundred or more for
      a meaningful number; published FVDs use 2048 or more clips).
    batch_size: clips per I3D step (rounded up to a multiple of the device count).
    resize: "half_pixel" (default) or "tf1", see `resize.py`.
    resolution: 224 for comparable FVDs; smaller is cheaper (tests, smoke runs).
    devices: default all local devices (data-parallel).
    extractor: a ready `i3d.I3DFeatures` to reuse (its own resize / resolution win).
  """
  from videoldm_jax.eval import i3d  # local: loads the 50 MB weights only when needed

  if extractor is None:
    extractor = i3d.I3DFeatures(batch_size, resize=resize, resolution=resolution,
                                devices=devices)
  sets = []
  for name, v in (("real", real_NxTxHxWx3), ("fake", fake_MxTxHxWx3)):
    if v.ndim != 5 or v.shape[1] < num_frames or v.shape[-1] != 3:
      # (Checked here: the extractor names the shape after the cut to num_frames.)
      raise ValueError(f"{name} videos: expected (N, T >= {num_frames}, H, W, 3), got "
                       f"{v.shape}")
    sets.append(video_stats(extractor, v[:, :num_frames], show_progress))
  return stats_distance(*sets)
