"""scikit-learn -> ONNX, and the check that decides whether ORT may serve it."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from app.runtimes import OnnxRuntime, SklearnRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    verified: bool
    reason: str | None
    max_abs_diff: float | None = None

    def as_dict(self) -> dict:
        return {"verified": self.verified, "reason": self.reason, "max_abs_diff": self.max_abs_diff}


def to_onnx_bytes(estimator, n_features: int) -> bytes:
    """The estimator as an ONNX graph taking float32 [n, n_features];
    classifiers give (label, probabilities) with no ZipMap."""
    from skl2onnx import to_onnx  # imported here: it is slow to import and only needed when converting

    sample = np.zeros((1, n_features), dtype=np.float32)
    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "predict_proba") else None
    return to_onnx(estimator, sample, options=options).SerializeToString()


def convert_and_verify(estimator, task: str, classes, n_features: int, sample: np.ndarray,
                       tolerance: float, progress: Callable[[str], None] = lambda step: None
                       ) -> tuple[bytes | None, Verdict]:
    """Convert, then compare ORT with scikit-learn on sample. Never raises."""
    if len(sample) == 0:
        return None, Verdict(False, "no reference sample to verify the ONNX conversion on")
    if task == "classification" and not hasattr(estimator, "predict_proba"):
        return None, Verdict(False, f"{algorithm_of(estimator)} has no predict_proba{PROBA_HINTS.get(algorithm_of(estimator), '')}"
                                    "; served by scikit-learn, which gives labels only")
    progress("converting to ONNX")
    try:
        graph = to_onnx_bytes(estimator, n_features)
        candidate = OnnxRuntime(graph, task, classes)
    except Exception as exc:  # skl2onnx raises many types for unsupported models
        return None, Verdict(False, f"skl2onnx could not convert {type(estimator).__name__}: {first_line(exc)}")
    progress(f"verifying ONNX Runtime against scikit-learn on {len(sample)} reference rows")
    verdict = compare(SklearnRuntime(estimator, task), candidate, sample, task, tolerance)
    return (graph if verdict.verified else None), verdict


# Why a classifier has no probabilities, where scikit-learn makes it an option.
PROBA_HINTS = {"SVC": " (SVC without probability=True)", "NuSVC": " (NuSVC without probability=True)"}


def algorithm_of(estimator) -> str:
    """The final estimator's class name (a pipeline's last step)."""
    return type(getattr(estimator, "steps", [[None, estimator]])[-1][1]).__name__



def compare(reference: SklearnRuntime, candidate: OnnxRuntime, sample: np.ndarray,
            task: str, tolerance: float) -> Verdict:
    try:
        want = reference.run(sample)
        got = candidate.run(sample.astype(np.float32))
    except Exception as exc:
        return Verdict(False, f"running the reference sample failed: {first_line(exc)}")
    if task == "regression":
        diff = np.abs(want.labels.astype(np.float64) - got.labels.astype(np.float64))
        scale = np.maximum(1.0, np.abs(want.labels.astype(np.float64)))
        worst = float((diff / scale).max())
        ok = worst <= tolerance
        return Verdict(ok, None if ok else f"ONNX values differ by {worst:.3g} (relative) > {tolerance}", worst)
    mismatched = int((np.asarray(want.labels) != np.asarray(got.labels)).sum())
    if mismatched:
        return Verdict(False, f"ONNX labels differ on {mismatched} of {len(sample)} reference rows")
    if want.probabilities is None or got.probabilities is None:
        return Verdict(True, None, 0.0)
    worst = float(np.abs(want.probabilities - got.probabilities).max())
    ok = worst <= tolerance
    return Verdict(ok, None if ok else f"ONNX probabilities differ by {worst:.3g} > {tolerance}", worst)


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
