"""Classical cross-modal hashing baselines on frozen features: CCA + LSH and CCA-ITQ.

Both start from CCA between image and text features of the training split, which maps
the two modalities into one space where paired items are maximally correlated. Then:

* ``"lsh"``: random Gaussian hyperplanes in that space, one bit per side of each
  hyperplane (Charikar's sign random projections).
* ``"cca_itq"``: iterative quantisation (Gong, Lazebnik et al., PAMI 2013): an orthogonal
  rotation of the top-``bits`` CCA directions learned by alternating
  ``B = sign(V R)`` and an orthogonal Procrustes step. Here both modalities share the
  codes: ``B = sign((V_img + V_txt) R)`` and ``R`` minimises
  ``||B - V_img R||^2 + ||B - V_txt R||^2``.

Each CCA direction is scaled by its canonical correlation to the power ``corr_power``
(default 1), so that weakly correlated directions weigh less before quantisation.

``fit_baseline(name, img_train, txt_train, bits, seed)`` returns a ``Baseline`` with the
symmetric ``encode_image`` / ``encode_text``. The pieces (``fit_cca``,
``random_hyperplanes``, ``itq_rotation``) are public so that other methods can reuse them.

Towers of one dual encoder (CLIP) already map both modalities into one space, so they need
no CCA: ``shared_lsh`` and ``shared_itq`` hash that space directly, without labels or pairs
(each modality centred by its own mean, which removes the offset between CLIP's image and
text embeddings; ITQ's rotation is fitted on the image embeddings alone).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossmodal.codes import sign
from crossmodal.io import atomic_path
from crossmodal.registry import Registry

logger = logging.getLogger(__name__)

BASELINES: Registry[Baseline] = Registry("baseline")
register_baseline = BASELINES.register


# ----------------------------------------------------------------------------------------
# CCA
# ----------------------------------------------------------------------------------------
@dataclass
class CCA:
    """A fitted CCA: ``(x - mean_x) @ wx`` and ``(y - mean_y) @ wy`` are the aligned views.

    Columns are ordered by canonical correlation ``corr`` (descending); each projected view
    has unit variance per column on the training data.
    """

    mean_x: np.ndarray  # [dx]
    mean_y: np.ndarray  # [dy]
    wx: np.ndarray  # [dx, k]
    wy: np.ndarray  # [dy, k]
    corr: np.ndarray  # [k]

    def transform_x(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean_x) @ self.wx

    def transform_y(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=np.float64) - self.mean_y) @ self.wy


def _whitener(xc: np.ndarray, reg: float, rank_tol: float) -> np.ndarray:
    """``W [d, r]`` with ``W^T (C + reg I) W = I`` on the data's own subspace (rank r).

    ``C`` is the covariance of the centred data ``xc``; directions with variance below
    ``rank_tol * max variance`` (rank deficiency, constant features) are dropped, and
    ``reg`` is relative to the mean variance.
    """
    cov = xc.T @ xc / max(xc.shape[0] - 1, 1)  # [d, d]
    evals, evecs = np.linalg.eigh(cov)
    top = float(evals[-1]) if evals.size else 0.0
    if top <= 0:
        raise ValueError("features have zero variance on the training split; CCA is undefined")
    keep = evals > rank_tol * top
    ridge = reg * float(np.trace(cov)) / cov.shape[0]
    return evecs[:, keep] / np.sqrt(evals[keep] + ridge)


def fit_cca(x: np.ndarray, y: np.ndarray, dims: int | None = None, reg: float = 1e-4,
            rank_tol: float = 1e-9) -> CCA:
    """Regularised CCA between paired views ``x [n, dx]`` and ``y [n, dy]``.

    Args:
        x, y: paired training features (row i of each is the same item).
        dims: number of canonical directions kept (default: all, the smaller rank).
        reg: ridge added to each covariance, relative to its mean variance.
        rank_tol: eigenvalues below ``rank_tol * largest`` count as rank deficiency.

    Returns:
        A ``CCA``; ``len(corr)`` may be below ``dims`` when the data has lower rank.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be paired [n, d] arrays, got shapes {x.shape} and {y.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"CCA needs at least 2 training pairs, got {x.shape[0]}")
    mean_x, mean_y = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mean_x, y - mean_y
    wx, wy = _whitener(xc, reg, rank_tol), _whitener(yc, reg, rank_tol)
    cross = (xc @ wx).T @ (yc @ wy) / (x.shape[0] - 1)  # [rx, ry] whitened cross-covariance
    u, s, vt = np.linalg.svd(cross, full_matrices=False)
    k = len(s) if dims is None else min(dims, len(s))
    logger.debug("CCA: ranks %d/%d, top correlations %s", wx.shape[1], wy.shape[1], np.round(s[:4], 3))
    return CCA(mean_x, mean_y, wx @ u[:, :k], wy @ vt[:k].T, np.clip(s[:k], 0.0, 1.0))


# ----------------------------------------------------------------------------------------
# Quantisers
# ----------------------------------------------------------------------------------------
def random_hyperplanes(dim: int, bits: int, seed: int = 0) -> np.ndarray:
    """``[dim, bits]`` Gaussian hyperplane normals (sign random projections, one bit each)."""
    if dim < 1 or bits < 1:
        raise ValueError(f"need dim >= 1 and bits >= 1, got dim={dim}, bits={bits}")
    return np.random.default_rng(seed).standard_normal((dim, bits))


def random_rotation(dim: int, seed: int = 0) -> np.ndarray:
    """A uniformly random ``[dim, dim]`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def itq_rotation(views: list[np.ndarray], iters: int = 50, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Iterative quantisation: the rotation ``R`` minimising ``sum_v ||B - V_v R||^2``, ``B`` shared.

    Args:
        views: one or more zero-mean ``[n, c]`` projections of the same n items (one per
            modality); a single view is the original ITQ.
        iters: alternations of ``B = sign(sum_v V_v R)`` and the Procrustes update of ``R``.
        seed: seed of the random initial rotation.

    Returns:
        ``R [c, c]`` and the quantisation loss after each iteration (non-increasing).
    """
    total = np.sum(views, axis=0)  # [n, c]
    rot = random_rotation(total.shape[1], seed)
    losses = []
    for _ in range(iters):
        codes = sign(total @ rot).astype(np.float64)  # [n, c]
        u, _, vt = np.linalg.svd(total.T @ codes)  # max tr(R^T V^T B): R = U W^T
        rot = u @ vt
        losses.append(float(sum(np.sum((codes - v @ rot) ** 2) for v in views)))
    return rot, losses


# ----------------------------------------------------------------------------------------
# The Baseline object
# ----------------------------------------------------------------------------------------
@dataclass
class Baseline:
    """Linear hashing of each modality: ``sign((x - mean) @ proj)``.

    ``project_image`` / ``project_text`` give the continuous outputs before the sign (the
    float upper bound); ``encode_image`` / ``encode_text`` give ``int8 [n, bits]`` codes in
    {-1, +1} (0 maps to +1).
    """

    name: str
    bits: int
    mean_image: np.ndarray  # [d_img]
    mean_text: np.ndarray  # [d_txt]
    proj_image: np.ndarray  # [d_img, bits]
    proj_text: np.ndarray  # [d_txt, bits]
    info: dict[str, Any] = field(default_factory=dict)

    def project_image(self, x: np.ndarray) -> np.ndarray:
        return _project(x, self.mean_image, self.proj_image, "image")

    def project_text(self, x: np.ndarray) -> np.ndarray:
        return _project(x, self.mean_text, self.proj_text, "text")

    def encode_image(self, x: np.ndarray) -> np.ndarray:
        return sign(self.project_image(x))

    def encode_text(self, x: np.ndarray) -> np.ndarray:
        return sign(self.project_text(x))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the baseline to one ``.npz`` file, atomically."""
        import json

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, mean_image=self.mean_image, mean_text=self.mean_text, proj_image=self.proj_image,
                         proj_text=self.proj_text,
                         meta=np.array(json.dumps({"name": self.name, "bits": self.bits, "info": self.info})))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Baseline:
        import json

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no baseline file at {path}")
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in ("mean_image", "mean_text", "proj_image", "proj_text")}
        return cls(meta["name"], int(meta["bits"]), info=meta["info"], **arrays)


def _project(x: np.ndarray, mean: np.ndarray, proj: np.ndarray, modality: str) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if x.shape[1] != mean.shape[0]:
        raise ValueError(
            f"{modality} features have {x.shape[1]} dims; the baseline was fit on {mean.shape[0]}")
    return (x - mean) @ proj  # [n, bits]


# ----------------------------------------------------------------------------------------
# Registered baselines
# ----------------------------------------------------------------------------------------
def _scaled_cca(img: np.ndarray, txt: np.ndarray, dims: int, reg: float, corr_power: float) -> CCA:
    cca = fit_cca(img, txt, dims=dims, reg=reg)
    scale = cca.corr**corr_power
    return CCA(cca.mean_x, cca.mean_y, cca.wx * scale, cca.wy * scale, cca.corr)


@register_baseline("lsh")
def fit_cca_lsh(img: np.ndarray, txt: np.ndarray, bits: int, seed: int = 0, cca_dims: int | None = None,
                reg: float = 1e-4, corr_power: float = 1.0) -> Baseline:
    """Random hyperplanes on the CCA-aligned features (``cca_dims`` directions, default ``bits``)."""
    cca = _scaled_cca(img, txt, cca_dims or bits, reg, corr_power)
    planes = random_hyperplanes(cca.wx.shape[1], bits, seed)  # [k, bits]
    info = {"cca_dims": int(cca.wx.shape[1]), "canonical_correlations": cca.corr.round(4).tolist()}
    return Baseline("lsh", bits, cca.mean_x, cca.mean_y, cca.wx @ planes, cca.wy @ planes, info)


@register_baseline("cca_itq")
def fit_cca_itq(img: np.ndarray, txt: np.ndarray, bits: int, seed: int = 0, iters: int = 50,
                reg: float = 1e-4, corr_power: float = 1.0) -> Baseline:
    """CCA to ``bits`` directions, then an ITQ rotation shared by both modalities."""
    cca = _scaled_cca(img, txt, bits, reg, corr_power)
    if cca.wx.shape[1] < bits:
        raise ValueError(
            f"cca_itq needs {bits} CCA directions but the features give only {cca.wx.shape[1]} "
            f"(rank of the training features); use fewer bits or the 'lsh' baseline"
        )
    views = [cca.transform_x(img), cca.transform_y(txt)]
    rot, losses = itq_rotation(views, iters=iters, seed=seed)
    info = {"cca_dims": bits, "canonical_correlations": cca.corr.round(4).tolist(),
            "itq_iters": iters, "itq_loss_first": losses[0] if losses else None,
            "itq_loss_last": losses[-1] if losses else None}
    return Baseline("cca_itq", bits, cca.mean_x, cca.mean_y, cca.wx @ rot, cca.wy @ rot, info)


# ----------------------------------------------------------------------------------------
# One shared space (a dual encoder's embeddings): no CCA, no labels, no pairs
# ----------------------------------------------------------------------------------------
def _shared_dims(img: np.ndarray, txt: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    img, txt = np.atleast_2d(np.asarray(img, np.float64)), np.atleast_2d(np.asarray(txt, np.float64))
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image and text embeddings of one shared space must have the same size, got "
                         f"{img.shape[1]} and {txt.shape[1]} (towers of two different models?)")  # fmt: skip
    if len(img) < 2 or not len(txt):
        raise ValueError(f"need at least 2 image and 1 text embeddings, got {len(img)} and {len(txt)}")
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    return img, txt


def shared_lsh(img: np.ndarray, txt: np.ndarray, bits: int, seed: int = 0) -> Baseline:
    """Sign random projections of a shared embedding space, each modality centred by its own mean.

    Args:
        img: ``[n, d]`` image embeddings (their mean centres image inputs).
        txt: ``[m, d]`` text embeddings (their mean centres text inputs); unpaired.
        bits: code length (any; hyperplanes are drawn in the ``d``-dim space).
        seed: seed of the hyperplanes.
    """
    img, txt = _shared_dims(img, txt, bits)
    planes = random_hyperplanes(img.shape[1], bits, seed)  # [d, bits]
    return Baseline("shared_lsh", bits, img.mean(axis=0), txt.mean(axis=0), planes, planes.copy(),
                    {"n_image": len(img), "n_text": len(txt)})  # fmt: skip


def shared_itq(img: np.ndarray, txt: np.ndarray, bits: int, seed: int = 0, iters: int = 50) -> Baseline:
    """ITQ (Gong et al., PAMI 2013) on image embeddings, applied to texts of the same space.

    The image embeddings are centred by their mean and projected on their top ``bits``
    principal directions, then rotated by the ITQ rotation fitted on them. Texts are
    centred by the text mean and projected and rotated the same way: one projection
    ``P R`` for both modalities, two means.

    Args:
        img: ``[n, d]`` image embeddings (the collection to index); ``n > bits``, ``d >= bits``.
        txt: ``[m, d]`` text embeddings; only their mean is used.
        bits: code length.
        seed: seed of ITQ's initial rotation.
        iters: ITQ iterations.

    Raises:
        ValueError: sizes differ, or fewer dimensions or images than bits.
    """
    img, txt = _shared_dims(img, txt, bits)
    n, d = img.shape
    if bits > d or bits >= n:
        raise ValueError(f"ITQ on {n} embeddings of {d} dims cannot give {bits} bits: it needs more "
                         "embeddings than bits and at least as many dims (use fewer bits, or more images)")
    mean = img.mean(axis=0)
    centred = img - mean
    evals, evecs = np.linalg.eigh(centred.T @ centred / (n - 1))  # ascending
    pca = evecs[:, ::-1][:, :bits]  # [d, bits]
    rot, losses = itq_rotation([centred @ pca], iters=iters, seed=seed)
    proj = pca @ rot
    kept = float(evals[::-1][:bits].sum() / max(evals.sum(), 1e-12))
    info = {"n_image": n, "n_text": len(txt), "variance_kept": round(kept, 4), "itq_iters": iters,
            "itq_loss_first": losses[0] if losses else None, "itq_loss_last": losses[-1] if losses else None}
    return Baseline("shared_itq", bits, mean, txt.mean(axis=0), proj, proj.copy(), info)


def fit_baseline(name: str, img_train: np.ndarray, txt_train: np.ndarray, bits: int, seed: int = 0,
                 **options: Any) -> Baseline:
    """Fit the baseline registered as ``name`` (``"lsh"``, ``"cca_itq"``) on paired training features.

    Args:
        name: a name from ``list_baselines()``.
        img_train, txt_train: ``[n, d_img]`` and ``[n, d_txt]`` features, row i paired.
        bits: code length.
        seed: seed of the random hyperplanes or of the initial ITQ rotation.
        **options: builder options (``reg``, ``corr_power``, ``iters``, ``cca_dims``).

    Returns:
        A ``Baseline``; ``info["train_time_s"]`` holds the fitting time.
    """
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    builder: Callable[..., Baseline] = BASELINES.get(name)
    start = time.perf_counter()
    model = builder(np.asarray(img_train), np.asarray(txt_train), bits, seed, **options)
    model.info["train_time_s"] = round(time.perf_counter() - start, 4)
    logger.info("fitted %s (%d bits) on %d pairs in %.2fs", name, bits, len(img_train),
                model.info["train_time_s"])
    return model


def list_baselines() -> list[str]:
    return BASELINES.names()
