"""AnalyticsEngine on the reference CNN's real activations: kNN purity per cut, projections,
linear sufficient rules with a Clopper-Pearson bound, coverage/precision curves, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moco_compile import ActivationFrame
from moco_compile.analytics import (AnalyticsEngine, AnalyticsError, LinearCondition, NoRuleError,
                                    SufficientRule, separability_by_cut)
from moco_compile.errors import MocoError
from moco_compile.passes.bounds import clopper_pearson_upper

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
TROUSER = 1


@pytest.fixture(scope="module")
def frame(compiled) -> ActivationFrame:
    result, _ = compiled
    return result.frame


@pytest.fixture(scope="module")
def late(frame) -> AnalyticsEngine:
    return AnalyticsEngine.from_frame(frame, "layer3.0", class_names=FASHION)


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]


def test_purity_is_higher_at_a_late_cut_than_an_early_one(frame):
    purity = separability_by_cut(frame, ["layer1.0", "layer3.0"], k=10)
    early, late = purity["layer1.0"], purity["layer3.0"]
    predictions = frame["predictions"]
    chance = float(((np.bincount(predictions) / len(predictions)) ** 2).sum())
    assert chance + 0.2 < early.purity < late.purity - 0.1
    assert late.purity > 0.85 and late.rows == len(frame) and late.k == 10
    assert sorted(late.per_class) == list(range(10))
    assert all(0 <= value <= 1 for value in late.per_class.values())
    assert late.per_class[TROUSER] > late.per_class[6]  # trousers are easy, shirts are not
    json.dumps(late.to_dict())


def test_2d_embedding_and_frame_column_agree(frame, late):
    direct = AnalyticsEngine.from_2d_embedding(frame["layer3.0"], {"predictions": frame["predictions"]})
    assert direct.separability(k=5).purity == pytest.approx(late.separability(k=5).purity)
    assert set(late.targets) == {"predictions", "labels"}
    # the labels are a target too: neighbours share the true class less often than the predicted one
    assert late.separability(target_column="labels").purity < late.separability().purity


def test_frame_columns_of_higher_rank_are_pooled_or_flattened(frame, calibration):
    rows = 300
    images = calibration["images"][:rows]  # [N, 1, 28, 28]
    raw = ActivationFrame.from_arrays({"images": images, "sequence": images[:, 0],
                                       "predictions": frame["predictions"][:rows]})
    mean = AnalyticsEngine.from_frame(raw, "images")
    np.testing.assert_allclose(mean.embedding, images.mean(axis=(2, 3)), rtol=1e-6)
    flat = AnalyticsEngine.from_frame(raw, "images", pooling="flatten")
    assert flat.embedding.shape == (rows, 28 * 28) and flat.name == "images (flatten)"
    sequence = AnalyticsEngine.from_frame(raw, "sequence", pooling="max")  # [N, S, D]: pool over S
    np.testing.assert_allclose(sequence.embedding, images[:, 0].max(axis=1))
    assert set(mean.targets) == {"predictions"}
    # pixels carry some class structure, but far less than the network's late features
    assert flat.separability().purity > 0.5


def test_rule_for_an_easy_class_is_precise_and_round_trips(frame, late):
    rule = late.compute_linear_sufficient_rule(cls=TROUSER, precision=0.97, confidence=0.95)
    meta = rule.metadata
    assert meta["class"] == TROUSER and meta["class_name"] == "Trouser" and meta["feature"] == "layer3.0"
    assert meta["precision"] >= meta["precision_lower_bound"] >= 0.97
    assert meta["class_coverage"] > 0.6 and meta["coverage"] > 0.05
    assert meta["rows"] == len(late.holdout_rows_) and meta["fit_rows"] == len(late.fit_rows_)
    assert meta["precision_lower_bound"] == pytest.approx(
        1 - clopper_pearson_upper(meta["errors"], meta["fired_rows"], 0.95))
    features, predictions = frame["layer3.0"], frame["predictions"]
    held = late.holdout_rows_
    fired = rule.predict(features[held])
    assert fired.dtype == bool and fired.sum() == meta["fired_rows"]
    assert (predictions[held][fired] != TROUSER).sum() == meta["errors"]
    np.testing.assert_array_equal(fired, features[held] @ rule.condition.weights.astype(np.float64)
                                  + rule.condition.bias > rule.condition.threshold)
    # serialisable: through JSON and back, the rule fires on exactly the same rows
    restored = SufficientRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    np.testing.assert_array_equal(restored.predict(features), rule.predict(features))
    assert restored.metadata == json.loads(json.dumps(rule.metadata))
    condition = LinearCondition.from_dict(rule.condition.to_dict())
    assert len(condition.weights) == features.shape[1] and condition.threshold == rule.condition.threshold
    assert rule.predict(features[held[0]]).shape == (1,)  # one row as a [D] vector
    # the rows that fitted the scores agree too (no sign of a fluke split)
    fit_fired = rule.predict(features[late.fit_rows_])
    assert (predictions[late.fit_rows_][fit_fired] == TROUSER).mean() > 0.95


def test_coverage_precision_curves_per_class(tmp_path, late):
    curves = late.coverage_precision_curve()
    assert sorted(curves) == list(range(10))
    for curve in curves.values():
        assert np.all(np.diff(curve.coverage) > 0) and curve.coverage[-1] == pytest.approx(1.0)
        assert curve.class_coverage[-1] == pytest.approx(1.0)
        assert np.all(curve.precision_lower_bound <= curve.precision + 1e-12)
        assert np.all(np.diff(curve.thresholds) < 0)
    trouser = late.coverage_precision_curve(cls=TROUSER)[TROUSER]
    rule = late.compute_linear_sufficient_rule(cls=TROUSER, precision=0.97)
    point = int(np.flatnonzero(trouser.thresholds == rule.condition.threshold)[0])
    assert trouser.coverage[point] == pytest.approx(rule.metadata["coverage"])
    assert trouser.precision[point] == pytest.approx(rule.metadata["precision"])
    # at 60% of each class's rows, trousers are certified more precisely than shirts
    def precision_at(curve, coverage):
        return curve.precision[np.searchsorted(curve.class_coverage, coverage)]
    assert precision_at(curves[TROUSER], 0.6) > precision_at(curves[6], 0.6)
    json.dumps(trouser.to_dict())
    figure = late.plot_coverage_precision(tmp_path / "curves.png")
    assert figure.axes and len(figure.axes[0].lines) == 20
    _assert_png(tmp_path / "curves.png")


def test_projection_plots_write_pngs(tmp_path, late):
    figure = late.projection_plot(tmp_path / "pca.png")
    assert sum(len(c.get_offsets()) for c in figure.axes[0].collections) == late.max_plot_rows
    _assert_png(tmp_path / "pca.png")
    points, rows = late.projection("tsne", max_rows=300)
    assert points.shape == (300, 2) and np.isfinite(points).all() and len(np.unique(rows)) == 300
    late.projection_plot(tmp_path / "tsne.png", method="tsne", max_rows=300)
    _assert_png(tmp_path / "tsne.png")
    assert late.projection_plot(method="pca") is not None  # no path: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pca.png", "tsne.png"]


def test_unknown_frame_column_lists_the_existing_ones(frame):
    with pytest.raises(KeyError, match=r"no column 'layer9'.*its columns are: .*layer3\.0.*predictions"):
        AnalyticsEngine.from_frame(frame, "layer9")
    with pytest.raises(KeyError, match=r"no target 'logits'; the engine's targets are: predictions, labels"):
        AnalyticsEngine.from_frame(frame, "layer3.0").separability(target_column="logits")
    without = frame[["layer3.0", "labels"]]
    with pytest.raises(KeyError, match=r"no 'predictions' column.*layer3\.0, labels.*target_columns"):
        AnalyticsEngine.from_frame(without, "layer3.0")
    engine = AnalyticsEngine.from_frame(without, "layer3.0", target_columns=["labels"])
    assert engine.separability(target_column="labels").purity > 0.8


def test_class_without_calibration_rows(frame):
    predictions = frame["predictions"]
    keep = predictions != 3
    engine = AnalyticsEngine.from_2d_embedding(frame["layer3.0"][keep], {"predictions": predictions[keep]})
    with pytest.raises(AnalyticsError, match=r"class 3 has no calibration rows.*classes present: 0, 1, 2, 4"):
        engine.compute_linear_sufficient_rule(cls=3)
    with pytest.raises(MocoError, match="class 12 has no calibration rows"):
        engine.coverage_precision_curve(cls=12)


def test_rule_that_would_fire_on_no_row_is_refused(frame, late):
    with pytest.raises(NoRuleError, match=r"would fire on no row.*needs at least 2995 fired rows.*lower precision"):
        late.compute_linear_sufficient_rule(cls=TROUSER, precision=0.999)
    # the first cut cannot certify shirts although the class has enough rows for the bound
    early = AnalyticsEngine.from_frame(frame, "layer1.0")
    with pytest.raises(NoRuleError, match=r"would fire on no row \(among the \d+ held-out rows of class 6"):
        early.compute_linear_sufficient_rule(cls=6, precision=0.97)


def test_mismatched_rows_and_malformed_input(frame):
    features, predictions = frame["layer3.0"], frame["predictions"]
    with pytest.raises(ValueError, match=r"row counts differ: embedding 'embedding' has 4000 rows but "
                                         r"target 'predictions' has 3999"):
        AnalyticsEngine.from_2d_embedding(features, {"predictions": predictions[:-1]})
    with pytest.raises(ValueError, match=r"must be \[N, D\].*from_frame"):
        AnalyticsEngine.from_2d_embedding(features[:, :, None], {"predictions": predictions})
    broken = features.copy()
    broken[5, 3] = np.nan
    with pytest.raises(AnalyticsError, match="NaN or Inf in 1 of 4000 rows"):
        AnalyticsEngine.from_2d_embedding(broken, {"predictions": predictions})
    with pytest.raises(AnalyticsError, match="integer class ids"):
        AnalyticsEngine.from_2d_embedding(features, {"predictions": predictions + 0.5})
    with pytest.raises(AnalyticsError, match="unknown pooling 'avg'; choose one of mean, max, flatten"):
        AnalyticsEngine.from_frame(frame, "layer3.0", pooling="avg")
    engine = AnalyticsEngine.from_2d_embedding(features, {"predictions": predictions})
    with pytest.raises(AnalyticsError, match=r"k must be an integer in \[1, 3999\]"):
        engine.separability(k=4000)
    with pytest.raises(AnalyticsError, match="precision must be in"):
        engine.compute_linear_sufficient_rule(cls=1, precision=1.0)
    with pytest.raises(AnalyticsError, match="unknown projection 'mds'"):
        engine.projection("mds")
    with pytest.raises(AnalyticsError, match="missing: threshold"):
        LinearCondition.from_dict({"weights": [1.0], "bias": 0.0})
    with pytest.raises(AnalyticsError, match=r"reads 2 features per row; got an array of shape \(3, 5\)"):
        SufficientRule(LinearCondition([1.0, 2.0], 0.0, 0.0)).predict(np.zeros((3, 5)))
