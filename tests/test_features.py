"""app/features.py: request features -> float32 matrix, or an error that says
what is wrong and which features the model expects."""
from __future__ import annotations

import math

import numpy as np
import pytest

from app import features
from app.cache import Generations, PredictionCache
from app.metrics import Metrics
from app.errors import BatchTooLarge, InvalidFeatures, InvalidField
from app.loader import LoadedModel

NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROW = [5.1, 3.5, 1.4, 0.2]
EXPECTS = "iris_classifier expects 4: sepal_length, sepal_width, petal_length, petal_width"


@pytest.fixture
def model() -> LoadedModel:
    # Only the model's identity and feature names matter to app/features.py.
    return LoadedModel("iris_classifier", 1, "classification", list(NAMES), [0, 1, 2], runtime=None, metadata={})


def refused(call, *args, kind=InvalidFeatures) -> str:
    with pytest.raises(kind) as info:
        call(*args)
    error = info.value
    assert "\n" not in error.message
    if kind is InvalidFeatures:
        assert error.status == 422 and error.code == "invalid_features"
    return error.message


# --- one row ------------------------------------------------------------------

def as_matrix(row):
    return features.matrix((row,), "features")


CACHE = PredictionCache(None, None, Generations(16), Metrics())


def row_key(model, row: list) -> bytes:
    return CACHE.key(model, row)


def key_prefix(model) -> bytes:
    return CACHE.key_format(model).prefix


def test_single_list(model):
    row = features.single(model, ROW)
    X = as_matrix(row)
    assert X.dtype == np.float32 and X.shape == (1, 4)
    assert X.tolist() == [[np.float32(v).item() for v in ROW]]
    # the packed bytes used for cache keys are exactly what the model sees
    assert row_key(model, row) == key_prefix(model) + X.tobytes()


def test_single_integers_and_mixed(model):
    assert as_matrix(features.single(model, [5, 3, 1, 0])).tolist() == [[5.0, 3.0, 1.0, 0.0]]
    assert as_matrix(features.single(model, [5, 3.5, 1, 0.25])).tolist() == [[5.0, 3.5, 1.0, 0.25]]


def test_single_dict_in_any_order_equals_list(model):
    in_order = dict(zip(NAMES, ROW))
    reversed_order = dict(reversed(list(in_order.items())))
    expected = features.single(model, ROW)
    assert np.array_equal(features.single(model, in_order), expected)
    assert np.array_equal(features.single(model, reversed_order), expected)


def test_single_float32_extremes_are_accepted(model):
    biggest = float(np.finfo(np.float32).max)
    row = features.single(model, [biggest, -biggest, 1e-45, 0.0])
    assert np.isfinite(as_matrix(row)).all()
    assert row_key(model, row) == key_prefix(model) + as_matrix(row).tobytes()


@pytest.mark.parametrize("value", ["5.1,3.5,1.4,0.2", 5.1, None, True, (5.1,)])
def test_single_not_a_list_or_object(model, value):
    message = refused(features.single, model, value)
    assert message == ("features must be a list of 4 numbers or an object keyed by feature name")


def test_single_error_carries_the_expected_names(model):
    with pytest.raises(InvalidFeatures) as info:
        features.single(model, ROW[:3])
    assert info.value.details["expected"] == NAMES


@pytest.mark.parametrize("row, count", [(ROW[:3], 3), (ROW + [1.0], 5), ([], 0)])
def test_single_wrong_count(model, row, count):
    assert refused(features.single, model, row) == f"features has {count} values; {EXPECTS}"


def test_one_row_wrapped_in_a_list_points_at_batch_predict(model):
    assert refused(features.single, model, [ROW]) == \
        f"features has 1 values; {EXPECTS}; several rows go to /api/v1/batch_predict as features_batch"


@pytest.mark.parametrize("value, described", [("3.5", "a string"), (True, "a boolean"), (False, "a boolean"),
                                              (None, "null"), ([3.5], "a list"), ({"v": 3.5}, "an object")])
def test_single_non_number_names_the_position_and_feature(model, value, described):
    row = [5.1, value, 1.4, 0.2]
    hint = "; several rows go to /api/v1/batch_predict as features_batch" if described == "a list" else ""
    assert refused(features.single, model, row) == f"features[1] (sepal_width) must be a number, got {described}{hint}"


def test_rows_sent_to_predict_point_at_batch_predict(model):
    two = refused(features.single, model, [[5.1, 3.5, 1.4, 0.2], [6.0, 3.0, 4.8, 1.8]])
    assert two == f"features has 2 values; {EXPECTS}; several rows go to /api/v1/batch_predict as features_batch"
    one = refused(features.single, model, [[5.1, 3.5, 1.4, 0.2], 1, 2, 3])
    assert one.endswith("got a list; several rows go to /api/v1/batch_predict as features_batch")
    # Inside a batch the hint would be wrong: it is not given.
    assert "batch_predict" not in refused(features.batch, model, [[[1, 2, 3, 4]] * 4], 10)


def test_single_first_bad_value_is_reported(model):
    assert refused(features.single, model, [5.1, 3.5, "x", None]).startswith("features[2] (petal_length)")


def test_dict_unknown_name(model):
    message = refused(features.single, model, {**dict(zip(NAMES, ROW)), "petal_colour": 1.0})
    assert message == f"features: unknown feature(s) 'petal_colour'; {EXPECTS.replace(' 4:', '')}"


def test_dict_missing_name(model):
    message = refused(features.single, model, dict(zip(NAMES[:3], ROW[:3])))
    assert "missing 'petal_width'" in message
    for name in NAMES:
        assert name in message


def test_dict_unknown_and_missing(model):
    message = refused(features.single, model, {"SEPAL_LENGTH": 5.1, "sepal_width": 3.5, "petal_length": 1.4,
                                               "petal_width": 0.2})
    assert "unknown feature(s) 'SEPAL_LENGTH'" in message
    assert "missing 'sepal_length'" in message
    assert message.endswith("sepal_length, sepal_width, petal_length, petal_width")


def test_dict_empty(model):
    message = refused(features.single, model, {})
    assert "missing 'sepal_length', 'sepal_width', 'petal_length', 'petal_width'" in message


def test_dict_non_number_value_names_the_feature(model):
    message = refused(features.single, model, {"sepal_length": 5.1, "sepal_width": 3.5,
                                               "petal_length": "1.4", "petal_width": 0.2})
    assert message == "features[2] (petal_length) must be a number, got a string"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e39, -3.5e38, 1e308])
def test_single_non_finite_or_beyond_float32(model, value):
    message = refused(features.single, model, [5.1, 3.5, 1.4, value])
    assert message == "features[3] is not a finite number within float32 range"


def test_single_non_finite_in_a_dict_is_reported_at_the_model_position(model):
    message = refused(features.single, model, {"petal_width": 0.2, "sepal_width": math.nan,
                                               "sepal_length": 5.1, "petal_length": 1.4})
    assert message == "features[1] is not a finite number within float32 range"


def test_single_integer_too_large_for_any_float(model):
    # A JSON integer literal of hundreds of digits parses to an int no float holds.
    message = refused(features.single, model, [5.1, 3.5, 1.4, 10 ** 400])
    assert message.startswith("features[3]")


# --- batch --------------------------------------------------------------------

def test_batch_fast_path(model):
    rows = [ROW, [7.7, 3.0, 6.1, 2.3], [6, 3, 4, 1]]
    X = features.batch(model, rows, 10)
    assert X.dtype == np.float32 and X.shape == (3, 4)
    assert np.array_equal(X, np.array(rows, dtype=np.float32))


def test_batch_slow_path_dict_rows_equal_list_rows(model):
    rows = [ROW, [7.7, 3.0, 6.1, 2.3]]
    dict_rows = [dict(zip(NAMES, rows[0])), dict(reversed(list(zip(NAMES, rows[1]))))]
    expected = features.batch(model, rows, 10)
    assert np.array_equal(features.batch(model, dict_rows, 10), expected)
    assert np.array_equal(features.batch(model, [dict_rows[0], rows[1]], 10), expected)


def test_batch_single_row_equals_single(model):
    assert np.array_equal(features.batch(model, [ROW], 1), as_matrix(features.single(model, ROW)))


@pytest.mark.parametrize("rows", [{"0": ROW}, "rows", None, 5, ROW[0]])
def test_batch_not_a_list(model, rows):
    message = refused(features.batch, model, rows, 10, kind=InvalidField)
    assert message == "features_batch must be a list of rows"


def test_batch_empty(model):
    assert refused(features.batch, model, [], 10, kind=InvalidField) == "features_batch is empty"


def test_batch_row_limit(model):
    assert features.batch(model, [ROW] * 5, 5).shape == (5, 4)
    with pytest.raises(BatchTooLarge) as info:
        features.batch(model, [ROW] * 6, 5)
    assert info.value.status == 413 and info.value.code == "batch_too_large"
    assert info.value.message == "features_batch has 6 rows; at most 5 are accepted"


def test_batch_row_limit_checked_before_the_rows(model):
    with pytest.raises(BatchTooLarge):
        features.batch(model, [[1]] * 11, 10)


def test_batch_flat_row_is_refused(model):
    message = refused(features.batch, model, ROW, 10)
    assert message == "features_batch[0] must be a list of 4 numbers or an object keyed by feature name"


def test_batch_ragged_rows_name_the_row(model):
    message = refused(features.batch, model, [ROW, ROW[:3], ROW], 10)
    assert message == f"features_batch[1] has 3 values; {EXPECTS}"


def test_batch_bad_value_in_the_middle_names_row_and_column(model):
    rows = [ROW, ROW, [5.1, True, 1.4, 0.2], ROW]
    assert refused(features.batch, model, rows, 10) == \
        "features_batch[2][1] (sepal_width) must be a number, got a boolean"


def test_batch_null_row(model):
    message = refused(features.batch, model, [ROW, None], 10)
    assert message.startswith("features_batch[1] must be a list of 4 numbers")


def test_batch_dict_row_with_unknown_name(model):
    rows = [ROW, {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_wdth": 0.2}]
    message = refused(features.batch, model, rows, 10)
    assert message.startswith("features_batch[1]: unknown feature(s) 'petal_wdth'; missing 'petal_width'")
    assert message.endswith("sepal_length, sepal_width, petal_length, petal_width")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e39])
def test_batch_non_finite_names_row_and_column(model, value):
    rows = [ROW, ROW, [5.1, 3.5, 1.4, 0.2], [5.1, 3.5, value, 0.2]]
    assert refused(features.batch, model, rows, 10) == \
        "features_batch[3][2] is not a finite number within float32 range"


def test_batch_non_finite_in_the_only_row_still_names_the_row(model):
    assert refused(features.batch, model, [[math.inf, 3.5, 1.4, 0.2]], 10) == \
        "features_batch[0][0] is not a finite number within float32 range"


def test_batch_integer_too_large_for_any_float(model):
    message = refused(features.batch, model, [ROW, [5.1, 3.5, 1.4, 10 ** 400]], 10)
    assert message.startswith("features_batch[1]")


def test_type_names():
    assert [features.type_name(v) for v in (True, "s", None, [], {}, 1.5)] == \
        ["a boolean", "a string", "null", "a list", "an object", "float"]
