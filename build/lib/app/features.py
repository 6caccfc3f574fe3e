"""Request features -> the float32 matrix a model sees, or InvalidFeatures
saying exactly what is wrong and what the model expects."""
from __future__ import annotations

import warnings
from itertools import chain
from math import isfinite

import numpy as np

from app.errors import BatchTooLarge, InvalidFeatures, InvalidField
from app.loader import LoadedModel

# bool is a subclass of int but true/false are not measurements: refused.
is_number = frozenset((int, float)).__contains__
FLOAT32_MAX = float(np.finfo(np.float32).max)
ROWS_HINT = "; several rows go to /api/v1/batch_predict as features_batch"
# Values beyond float32 become inf, which finite() refuses with a 422; the
# cast's warning would only add noise to the log.
warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)


def width_change(width: int, serving_names: list[str], serving_version: int | None) -> str | None:
    """Why a version taking width features must not replace the serving one, or None.
    Clients send what the serving version takes: a new width would break every one."""
    if serving_names and width != len(serving_names):
        return (f"it takes {width} features, v{serving_version} takes {len(serving_names)} "
                f"({', '.join(serving_names)}); clients would break")
    return None


def single(model: LoadedModel, features) -> list:
    """One row of numbers, each finite and within float32 range, in the
    model's feature order (`matrix((row,), ...)` makes what the model sees)."""
    row = as_list(model, features, "features")
    # PERF: in a busy server every numpy call runs with cold caches and costs
    # several times what a loop measures, so a single row is checked in plain
    # Python. Anything unusual takes the precise numpy path below.
    try:
        if all(map(isfinite, row)) and max(map(abs, row)) <= FLOAT32_MAX:
            return row
    except OverflowError:  # an int too large for a float
        pass
    return finite(matrix(row, "features").reshape(1, -1), "features")[0].tolist()


def batch(model: LoadedModel, rows, max_rows: int) -> np.ndarray:
    """Many rows as an (n, n_features) float32 matrix."""
    if type(rows) is not list:
        raise InvalidField("features_batch must be a list of rows")
    if not rows:
        raise InvalidField("features_batch is empty")
    if len(rows) > max_rows:
        raise BatchTooLarge(f"features_batch has {len(rows)} rows; at most {max_rows} are accepted")
    n = model.n_features
    if not all(type(r) is list and len(r) == n for r in rows) or not all(map(is_number, map(type, chain.from_iterable(rows)))):
        rows = [as_list(model, r, f"features_batch[{i}]") for i, r in enumerate(rows)]
    return finite(matrix(rows, "features_batch"), "features_batch")


def matrix(values: list, where: str) -> np.ndarray:
    try:
        return np.array(values, dtype=np.float32)
    except OverflowError:  # an integer too large for any float
        raise InvalidFeatures(f"{where}{overflow_at(values)} is not a finite number within float32 range") from None


def overflow_at(values: list) -> str:
    rows = values if values and type(values[0]) is list else [values]
    for r, row in enumerate(rows):
        for c, v in enumerate(row):
            if type(v) is int and abs(v) > 2 ** 128:
                return f"[{c}]" if rows is not values else f"[{r}][{c}]"
    return ""


def as_list(model: LoadedModel, features, where: str) -> list:
    if type(features) is dict:
        features = from_mapping(model, features, where)
    elif type(features) is not list:
        raise InvalidFeatures(f"{where} must be a list of {model.n_features} numbers or an object "
                              f"keyed by feature name", expected=model.feature_names)
    # Rows sent where one row is expected: say where they go.
    hint = ROWS_HINT if where == "features" and list in map(type, features) else ""
    if len(features) != model.n_features:
        raise InvalidFeatures(f"{where} has {len(features)} values; {model.name} expects "
                              f"{model.n_features}: {', '.join(model.feature_names)}{hint}",
                              expected=model.feature_names)
    if not all(map(is_number, map(type, features))):
        i = next(i for i, v in enumerate(features) if not is_number(type(v)))
        raise InvalidFeatures(f"{where}[{i}] ({model.feature_names[i]}) must be a number, "
                              f"got {type_name(features[i])}{hint}", expected=model.feature_names)
    return features


def from_mapping(model: LoadedModel, features: dict, where: str) -> list:
    unknown = [k for k in features if k not in model.feature_index]
    missing = [k for k in model.feature_names if k not in features]
    if unknown or missing:
        parts = ([f"unknown feature(s) {', '.join(map(repr, unknown[:10]))}"] if unknown else []) + \
                ([f"missing {', '.join(map(repr, missing[:10]))}"] if missing else [])
        raise InvalidFeatures(f"{where}: {'; '.join(parts)}; {model.name} expects "
                              f"{', '.join(model.feature_names)}", expected=model.feature_names)
    return [features[k] for k in model.feature_names]


def finite(X: np.ndarray, where: str) -> np.ndarray:
    # PERF: one vectorised check; catches NaN, +-Infinity and values beyond float32 range.
    if not np.isfinite(X).all():
        row, col = np.argwhere(~np.isfinite(X))[0]
        at = f"[{col}]" if X.shape[0] == 1 and where == "features" else f"[{row}][{col}]"
        raise InvalidFeatures(f"{where}{at} is not a finite number within float32 range")
    return X


def type_name(value) -> str:
    return {bool: "a boolean", str: "a string", type(None): "null", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)
