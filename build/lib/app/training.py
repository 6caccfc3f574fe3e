"""Training: fit an estimator on a CSV (or a bundled data set), evaluate it,
and publish it (app/publishing.py) as a new version of a model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from app.columns import feature_name
from app.conversion import first_line
from app.errors import InvalidData
from app.publishing import Progress, publish_estimator, silent
from app.repository import ModelRepository, ModelVersion


def algorithms() -> dict:
    """name -> (task, factory). Imported lazily: scikit-learn is slow to import."""
    from sklearn.cluster import DBSCAN, KMeans
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor, RandomForestClassifier
    from sklearn.linear_model import Lasso, LinearRegression, LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {
        "random_forest": ("classification", lambda: RandomForestClassifier(
            n_estimators=100, max_depth=10, min_samples_split=5, random_state=42)),
        "logistic_regression": ("classification", lambda: make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000))),
        "svm": ("classification", lambda: make_pipeline(StandardScaler(), SVC(probability=True, random_state=42))),
        "gradient_boosting": ("classification", lambda: GradientBoostingClassifier(random_state=42)),
        "linear": ("regression", LinearRegression),
        "ridge": ("regression", lambda: Ridge(alpha=1.0)),
        "lasso": ("regression", lambda: Lasso(alpha=0.1)),
        "gradient_boosting_regressor": ("regression", lambda: GradientBoostingRegressor(random_state=42)),
        "kmeans": ("clustering", lambda: make_pipeline(StandardScaler(), KMeans(n_clusters=3, n_init=10, random_state=42))),
        "dbscan": ("clustering", lambda: DBSCAN(eps=0.5, min_samples=5)),
    }


def evaluate(estimator, task: str, X: np.ndarray, y: np.ndarray | None, cv: int = 5) -> tuple[dict, str]:
    """Fit on a train split, score on the held-out split and by cross-validation.
    Returns (metrics, a printable report). The estimator ends fitted on the train split."""
    from sklearn import metrics as m
    from sklearn.model_selection import cross_val_score, train_test_split

    if task == "clustering":
        labels = estimator.fit_predict(X)
        found = len(set(labels) - {-1})
        score = float(m.silhouette_score(X, labels)) if 1 < found < len(X) else None
        report = f"clusters: {found}\nsilhouette: {score}"
        return {"n_clusters": found, "silhouette": score, "n_samples_train": len(X)}, report
    stratify = y if task == "classification" else None
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42, stratify=stratify)
    estimator.fit(X_train, y_train)
    predicted = estimator.predict(X_test)
    scores = cross_val_score(estimator, X, y, cv=cv)
    estimator.fit(X_train, y_train)
    common = {"cv_mean": float(scores.mean()), "cv_std": float(scores.std()),
              "n_samples_train": len(X_train), "n_samples_test": len(X_test)}
    if task == "classification":
        result = {"accuracy": float(m.accuracy_score(y_test, predicted)),
                  "f1_macro": float(m.f1_score(y_test, predicted, average="macro")), **common}
        report = m.classification_report(y_test, predicted)
    else:
        result = {"r2": float(m.r2_score(y_test, predicted)),
                  "mae": float(m.mean_absolute_error(y_test, predicted)),
                  "rmse": float(np.sqrt(m.mean_squared_error(y_test, predicted))), **common}
        report = "\n".join(f"{k}: {v:.4f}" for k, v in result.items() if isinstance(v, float))
    head = f"Accuracy: {result['accuracy']:.4f}\n" if task == "classification" else ""
    return result, f"{head}CV Score: {scores.mean():.4f} (+/- {scores.std():.4f})\n{report}"


def train_csv(repository: ModelRepository, csv_path: Path, target: str | None, name: str,
              algorithm: str, tolerance: float = 1e-5, progress: Progress = silent) -> tuple[ModelVersion, str]:
    """The whole train-evaluate-save flow for a CSV of numeric features and a target column."""
    import csv

    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 11:
        raise InvalidData(f"{csv_path}: {max(len(rows) - 1, 0)} data rows; training needs a header and at least 10 rows")
    header, body = rows[0], rows[1:]
    task, factory = algorithms()[algorithm]
    if task != "clustering" and target is None:
        raise InvalidData(f"{algorithm} learns a {task} target: name its column with --target; "
                          f"columns: {', '.join(header)}")
    if task != "clustering" and target not in header:
        raise InvalidData(f"{csv_path}: no target column {target!r}; columns: {', '.join(header)}")
    t = header.index(target) if target in header else None
    feature_cols = [i for i in range(len(header)) if i != t]
    try:
        X = np.array([[float(r[i]) for i in feature_cols] for r in body], dtype=np.float64)
    except ValueError as exc:
        raise InvalidData(f"{csv_path}: features must be numeric ({exc})") from None
    y = None
    try:
        if t is not None:
            raw = [r[t] for r in body]
            y = np.array([float(v) for v in raw]) if task == "regression" else np.array(as_labels(raw))
        estimator = factory()
        progress(f"training {algorithm} on {len(X)} rows and {X.shape[1]} features (with 5-fold cross-validation)")
        metrics, report = evaluate(estimator, task, X, y)
    except ValueError as exc:  # scikit-learn says what it cannot fit in a ValueError
        raise InvalidData(f"{csv_path}: cannot train {algorithm} on this data: {first_line(exc)}") from None
    names = [feature_name(header[i]) for i in feature_cols]
    mv = publish_estimator(repository, name, estimator, X, names, metrics, tolerance,
                           {"training_data": str(csv_path), "target": target}, progress=progress)
    return mv, report


def as_labels(raw: list[str]) -> list:
    """Class labels as ints when they all are, else as strings."""
    try:
        return [int(v) for v in raw]
    except ValueError:
        return raw


def build_demo_models(repository: ModelRepository, only_missing: bool = True) -> list[ModelVersion]:
    """The four demo models, from datasets bundled with scikit-learn."""
    from sklearn import datasets
    from sklearn.cluster import KMeans
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    demos = {
        "iris_classifier": (datasets.load_iris, lambda: RandomForestClassifier(
            n_estimators=100, max_depth=10, random_state=42), "classification"),
        "binary_classifier": (datasets.load_breast_cancer, lambda: make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000)), "classification"),
        "diabetes_regressor": (datasets.load_diabetes, lambda: GradientBoostingRegressor(
            n_estimators=200, max_depth=3, random_state=42), "regression"),
        "wine_clusters": (datasets.load_wine, lambda: make_pipeline(
            StandardScaler(), KMeans(n_clusters=3, n_init=10, random_state=42)), "clustering"),
    }
    built = []
    for name, (loader, factory, task) in demos.items():
        if only_missing and repository.root.joinpath(name).is_dir() and repository.versions(name):
            continue
        data = loader()
        X, y = np.asarray(data.data, dtype=np.float64), np.asarray(data.target)
        estimator = factory()
        metrics, _ = evaluate(estimator, task, X, None if task == "clustering" else y)
        names = [feature_name(n) for n in data.feature_names]
        built.append(publish_estimator(repository, name, estimator, X, names, metrics,
                                       extra={"training_data": f"sklearn.datasets.{loader.__name__}"}))
    return built
