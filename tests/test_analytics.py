"""AnalyticsEngine on the reference CNN's real activations: kNN purity per cut, projections,
linear sufficient rules (held-out precision, Clopper-Pearson bound, certified thresholds, and a
simulation with known ground truth), coverage/precision curves, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from moco_compile import ActivationFrame
from moco_compile.analytics import (AnalyticsEngine, AnalyticsError, LinearCondition, MLPCondition, NoRuleError,
                                    SufficientRule, separability_by_cut)
from moco_compile.errors import MocoError

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
TROUSER = 1


@pytest.fixture(scope="module")
def frame(reference_onnx, calibration, tmp_path_factory) -> ActivationFrame:
    """The reference CNN's pooled activations at every cut, with its predictions, on 4000 calibration rows."""
    from moco_compile import calibrate_frame

    path = tmp_path_factory.mktemp("analytics") / "frame.arrow"
    return calibrate_frame(reference_onnx, calibration, path, show_progress=False)


@pytest.fixture(scope="module")
def late(frame) -> AnalyticsEngine:
    return AnalyticsEngine.from_frame(frame, "layer3.0", class_names=FASHION)


def _clopper_pearson_lower(successes: int, rows: int, confidence: float) -> float:
    """One-sided exact lower bound, from scipy's two-sided exact interval at 2 * confidence - 1."""
    return stats.binomtest(successes, rows).proportion_ci(2 * confidence - 1, method="exact").low


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
    assert late.purity > 0.85 and late.rows == len(frame)
    assert sorted(late.per_class) == list(range(10))
    # the overall purity is the per-class purities weighted by class size
    shares = np.bincount(predictions) / len(predictions)
    assert late.purity == pytest.approx(sum(shares[c] * value for c, value in late.per_class.items()))
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


def test_certified_rule_for_an_easy_class_is_precise_and_round_trips(frame, late):
    rule = late.compute_linear_sufficient_rule(cls=TROUSER, precision=0.97, confidence=0.95, certify=True)
    meta = rule.metadata
    assert meta["class_name"] == "Trouser" and meta["feature"] == "layer3.0"
    assert meta["held_out_precision"] >= meta["precision_lower_bound"] >= 0.97
    assert meta["class_coverage"] > 0.6 and meta["coverage"] > 0.05
    assert meta["rows"] + meta["fit_rows"] == len(frame)
    assert not np.intersect1d(late.fit_rows_, late.holdout_rows_).size
    assert meta["precision_lower_bound"] == pytest.approx(
        _clopper_pearson_lower(meta["fired_rows"] - meta["errors"], meta["fired_rows"], 0.95))
    # fixed sequence: every threshold from the first firing on enough rows for the bound to reach 0.97
    # (log(0.05) / log(0.97) = 98.3) up to the chosen one passes, and the next one fails
    curve = late.coverage_precision_curve(cls=TROUSER)[TROUSER]
    point = int(np.flatnonzero(curve.thresholds == rule.condition.threshold)[0])
    start = int(np.searchsorted(np.round(curve.coverage * meta["rows"]), 99))
    assert start <= point and np.all(curve.precision_lower_bound[start:point + 1] >= 0.97)
    assert curve.precision_lower_bound[point + 1] < 0.97
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
    assert trouser.precision[point] == pytest.approx(rule.metadata["held_out_precision"])
    assert trouser.precision[point] >= 0.97 > trouser.precision[point + 1]  # the last of the first run
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
    assert len(late.projection_plot(method="pca").axes[0].collections) == 10  # no path: nothing written
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
        late.compute_linear_sufficient_rule(cls=TROUSER, precision=0.999, certify=True)
    # the first cut cannot certify shirts although the class has enough rows for the bound
    early = AnalyticsEngine.from_frame(frame, "layer1.0")
    with pytest.raises(NoRuleError, match=r"would fire on no row \(among the \d+ held-out rows of the class"):
        early.compute_linear_sufficient_rule(cls=6, precision=0.97, certify=True)


def test_seed_call_on_a_few_hundred_rows_reaches_the_precision_on_held_out_rows(frame):
    rows = 300
    small, unseen = frame[:rows], frame[rows:]
    engine = AnalyticsEngine.from_frame(small, "layer3.0")
    rule = engine.compute_linear_sufficient_rule("predictions", TROUSER)
    meta = rule.metadata
    held = engine.holdout_rows_
    fired = rule.predict(small["layer3.0"][held])
    correct = int((small["predictions"][held][fired] == TROUSER).sum())
    assert fired.sum() == meta["fired_rows"] > 5 and meta["rows"] == len(held) == rows // 2
    assert meta["held_out_precision"] == correct / fired.sum() >= 0.99
    assert meta["coverage"] == pytest.approx(fired.mean())
    # the bound is the exact one for the fired rows, below the estimate, and below 0.99: with fewer than
    # 299 fired rows no bound reaches 0.99 at 95%
    assert meta["precision_lower_bound"] == pytest.approx(_clopper_pearson_lower(correct, int(fired.sum()), 0.95))
    assert meta["precision_lower_bound"] <= meta["held_out_precision"] and meta["precision_lower_bound"] < 0.99
    # the bound holds on the 3700 rows the engine never saw
    fires = rule.predict(unseen["layer3.0"])
    assert (unseen["predictions"][fires] == TROUSER).mean() >= meta["precision_lower_bound"]

    with pytest.raises(NoRuleError, match=r"precision 0\.99 certified at confidence 0\.95: the rule would fire on "
                                          r"no row \(only \d+ of the 150 held-out rows are the class; .* needs at "
                                          r"least 299 fired rows.*Drop certify=True"):
        engine.compute_linear_sufficient_rule("predictions", TROUSER, certify=True)
    # at the first cut the best-scored held-out T-shirt is not one: no threshold reaches 0.99
    early = AnalyticsEngine.from_frame(small, "layer1.0")
    with pytest.raises(NoRuleError, match=r"reaches precision 0\.99 on the held-out rows: the rule would fire on no "
                                          r"row \(at every threshold more than 1\.00% of the fired held-out rows"):
        early.compute_linear_sufficient_rule("predictions", 0)


def test_certified_rules_keep_the_precision_at_the_stated_confidence():
    """Simulation with known ground truth.  One feature x; class 1 with probability ``prior`` and
    x ~ N(shift, 1) there, N(0, 1) otherwise, so the rule "x > u" has the precision
    prior S(u - shift) / (prior S(u - shift) + (1 - prior) S(u)), S the normal survival function.
    A certified rule may fall short of the required precision in at most 1 - confidence of the trials."""
    prior, shift, precision, confidence, trials, rows = 0.3, 2.5, 0.9, 0.9, 400, 1000

    def true_precision(condition: LinearCondition) -> float:
        cut = (condition.threshold - condition.bias) / condition.weights[0]  # score > t <=> x > cut
        hit = prior * stats.norm.sf(cut - shift)
        return hit / (hit + (1 - prior) * stats.norm.sf(cut))

    found, short, below_bound = {True: 0, False: 0}, {True: 0, False: 0}, {True: 0, False: 0}
    for trial in range(trials):
        rng = np.random.default_rng(trial)
        classes = (rng.random(rows) < prior).astype(np.int64)
        x = rng.normal(size=rows) + shift * classes
        engine = AnalyticsEngine.from_2d_embedding(x[:, None], {"predictions": classes}, seed=trial)
        for certify in (True, False):
            try:
                rule = engine.compute_linear_sufficient_rule(cls=1, precision=precision, confidence=confidence,
                                                             certify=certify)
            except NoRuleError:
                continue  # no rule, no claim
            assert rule.condition.weights[0] > 0
            truth = true_precision(rule.condition)
            found[certify] += 1
            short[certify] += truth < precision
            below_bound[certify] += truth < rule.metadata["precision_lower_bound"]
    slack = stats.binom.ppf(0.999, trials, 1 - confidence)  # 60 of 400 at 10%
    assert found[True] > 0.8 * trials and found[False] == trials
    assert short[True] <= slack
    assert below_bound[True] <= slack and below_bound[False] <= slack
    # the check has teeth: rules chosen by their held-out precision alone fall short about half the time
    assert short[False] > 2 * slack


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


def test_the_mlp_sibling_certifies_its_rule_the_same_way_and_fires_on_more_rows(frame):
    """At the first cut, where a linear score separates the classes worst, no linear rule for trousers
    certifies precision 0.97 while the MLP rule does, its threshold chosen by the same fixed-sequence
    Clopper-Pearson walk."""
    engine = AnalyticsEngine.from_frame(frame, "layer1.0", class_names=FASHION)
    with pytest.raises(NoRuleError, match="no linear rule for class 1"):
        engine.compute_linear_sufficient_rule(cls=TROUSER, precision=0.97, certify=True)
    mlp = engine.compute_mlp_sufficient_rule(cls=TROUSER, precision=0.97, certify=True)
    meta = mlp.metadata
    assert meta["certified"] and meta["precision_lower_bound"] >= 0.97 and "MLP head" in meta["method"]
    assert meta["fired_rows"] > 150
    held, features = engine.holdout_rows_, frame["layer1.0"]
    fired = mlp.predict(features[held])
    correct = int((frame["predictions"][held][fired] == TROUSER).sum())
    assert fired.sum() == meta["fired_rows"] and fired.sum() - correct == meta["errors"]
    assert meta["precision_lower_bound"] == pytest.approx(_clopper_pearson_lower(correct, int(fired.sum()), 0.95))
    restored = SufficientRule.from_dict(json.loads(json.dumps(mlp.to_dict())))
    assert isinstance(restored.condition, MLPCondition)
    np.testing.assert_array_equal(restored.predict(features), mlp.predict(features))
    with pytest.raises(AnalyticsError, match="an MLP condition needs the keys .* missing: cls"):
        MLPCondition.from_dict({k: v for k, v in mlp.condition.to_dict().items() if k != "cls"})
    with pytest.raises(AnalyticsError, match=f"reads {features.shape[1]} features per row"):
        mlp.predict(features[:3, :5])
