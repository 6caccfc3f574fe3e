"""CSV column names as feature names: the one normalisation that training
(which names a model's features) and batch prediction (which finds them in a
file) share, so the CSV a model was trained on is the CSV it predicts on."""
from __future__ import annotations

import re


def feature_name(column: str) -> str:
    """'sepal length (cm)' -> 'sepal_length', 'od280/od315 of ...' -> 'od280_od315_of_...'."""
    name = re.sub(r"\(.*?\)", "", str(column)).strip().lower()
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "feature"


def find(header: list[str], features: list[str]) -> tuple[dict[str, int], list[str]]:
    """({feature: column index}, features not found). A column matches a
    feature by its name as written, else by its normalised name."""
    exact = {name.strip(): i for i, name in reversed(list(enumerate(header)))}
    normal = {feature_name(name): i for i, name in reversed(list(enumerate(header)))}
    found = {f: exact[f] if f in exact else normal[f] for f in features if f in exact or f in normal}
    return found, [f for f in features if f not in found]
