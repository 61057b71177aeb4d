"""Analytics on a model's activations: how separable the classes are at a cut, and
which linear "sufficient rules" could exit there.

:class:`AnalyticsEngine` looks at one embedding (one cut of the network, one row
per input) together with per-row targets, usually the full model's
``predictions`` and, when known, the ``labels``:

* :meth:`AnalyticsEngine.separability`: kNN class purity, i.e. how often a row's
  nearest neighbours get the same class from the full model (per class too);
* :meth:`AnalyticsEngine.projection_plot`: a 2-D projection (PCA, t-SNE, or UMAP
  where ``umap-learn`` is installed) coloured by class;
* :meth:`AnalyticsEngine.compute_linear_sufficient_rule`: a rule
  ``x @ w + b > t`` that, where it fires, agrees with the target class at a stated
  precision on held-out rows, with a Clopper-Pearson lower bound of its precision
  (or, with ``certify=True``, whose precision is certified at a stated confidence);
* :meth:`AnalyticsEngine.compute_mlp_sufficient_rule`: the same with the compiler's MLP exit head
  (one hidden ReLU layer) in place of the linear score;
* :meth:`AnalyticsEngine.coverage_precision_curve` and
  :meth:`AnalyticsEngine.plot_coverage_precision`: the trade-off the threshold
  makes, per class.

Rules are fitted with :class:`moco_compile.passes.calibration.rules.OneVsRestRuleFitter`, the
engine the compiler uses, so what the analytics show is what ``compile`` can get.

>>> engine = AnalyticsEngine.from_frame(result.frame, "layer3.0")          # doctest: +SKIP
>>> engine.separability(k=10).purity                                       # doctest: +SKIP
>>> rule = engine.compute_linear_sufficient_rule(cls=1, precision=0.95)    # doctest: +SKIP
>>> rule.predict(features), rule.metadata["coverage"]                      # doctest: +SKIP
>>> rule.metadata["held_out_precision"], rule.metadata["precision_lower_bound"]  # doctest: +SKIP

Plots use matplotlib's object API (no pyplot, no global backend change) and
need ``pip install 'moco-compile[analytics]'``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moco_compile.analytics.inputs import POOLINGS, check_embedding, check_targets, pool_features
from moco_compile.analytics.plots import class_colours, new_figure, pad2, save_png
from moco_compile.analytics.results import (AnalyticsError, CoveragePrecisionCurve, LinearCondition, MLPCondition,
                                            NoRuleError, Separability, SufficientRule)
from moco_compile.analytics.thresholds import last_certified, last_precise, threshold_table
from moco_compile.constants import LABELS, PREDICTIONS
from moco_compile.frame import ActivationFrame
from moco_compile.passes.calibration.mlp_head import DistilledMLPFitter, MLPScores
from moco_compile.passes.calibration.rules import LinearScores, OneVsRestRuleFitter
from moco_compile.passes.planning.bounds import clopper_pearson_upper, rows_needed

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_FRAME_TARGETS = (PREDICTIONS, LABELS)
_HEAD_METHODS = {"linear": "one-vs-rest logistic score (OneVsRestRuleFitter)",
                 "mlp": "log-probability of an MLP head (DistilledMLPFitter, one hidden ReLU layer)"}
_PROJECTIONS = ("pca", "tsne", "umap")


# ----------------------------------------------------------------------------- engine


class AnalyticsEngine:
    """Separability, projections and linear sufficient rules for one embedding.

    Build it with :meth:`from_2d_embedding` (an ``[N, D]`` array) or
    :meth:`from_frame` (a column of an :class:`~moco_compile.frame.ActivationFrame`,
    any rank); the constructor takes the same arguments as ``from_2d_embedding``.

    Parameters
    ----------
    embedding:
        ``[N, D]`` features, one row per input.
    targets:
        Per-row integer class ids, ``{name: [N] array}``; ``predictions`` (the full
        model's classes) is the default target everywhere.
    name:
        What the embedding is (e.g. the frame column); recorded in rules and plot titles.
    class_names:
        Optional display names, indexed by class id (used in plot legends).
    seed:
        Seeds the fit/held-out split of the rules, subsampling and t-SNE.
    fit_fraction:
        Fraction of rows that fit the linear scores; the rest choose thresholds and
        give the held-out statistics.
    standardize:
        Standardise each feature before kNN and projections (rules always
        standardise internally and fold it into their weights).
    max_knn_rows, max_plot_rows:
        Row caps (a seeded subsample) for the kNN purity and for projections.
    regularization, max_iter:
        Passed to :class:`~moco_compile.passes.calibration.rules.OneVsRestRuleFitter`.
    n_jobs:
        Threads for kNN, projections and BLAS inside them (``-1``: all cores).  The
        default 1 is usually fastest for these sizes and never fights other work.
    """

    def __init__(self, embedding: np.ndarray, targets: Mapping[str, np.ndarray], *, name: str = "embedding",
                 class_names: Sequence[str] | None = None, seed: int = 0, fit_fraction: float = 0.5,
                 standardize: bool = True, max_knn_rows: int | None = 20000, max_plot_rows: int = 2000,
                 regularization: float = 0.1, max_iter: int = 500, n_jobs: int = 1) -> None:
        self.embedding = check_embedding(embedding, name)
        self.targets = check_targets(targets, len(self.embedding), name)
        if not 0 < fit_fraction < 1:
            raise AnalyticsError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
        for param, value in (("max_knn_rows", max_knn_rows), ("max_plot_rows", max_plot_rows)):
            if value is not None and value < 2:
                raise AnalyticsError(f"{param} must be at least 2, got {value}")
        self.name = name
        self.class_names = list(class_names) if class_names is not None else None
        self.seed = seed
        self.fit_fraction = fit_fraction
        self.standardize = standardize
        self.max_knn_rows = max_knn_rows
        self.max_plot_rows = max_plot_rows
        self.regularization = regularization
        self.max_iter = max_iter
        if n_jobs == 0 or not isinstance(n_jobs, (int, np.integer)):
            raise AnalyticsError(f"n_jobs must be a positive integer or -1 (all cores), got {n_jobs!r}")
        self.n_jobs = int(n_jobs)
        order = np.random.default_rng(seed).permutation(len(self.embedding))
        split = int(round(len(order) * fit_fraction))
        #: Row indices that fit the linear scores, and the held-out rows that choose thresholds.
        self.fit_rows_ = np.sort(order[:split])
        self.holdout_rows_ = np.sort(order[split:])
        self._scores: dict[str, LinearScores] = {}
        self._mlp_scores: dict[str, MLPScores] = {}

    # --------------------------------------------------------------- constructors

    @classmethod
    def from_2d_embedding(cls, embedding: np.ndarray, targets: Mapping[str, np.ndarray],
                          **config: Any) -> "AnalyticsEngine":
        """An engine on an ``[N, D]`` embedding with per-row targets, e.g. ``{"predictions": preds}``.

        ``config`` is passed to the constructor (``seed``, ``class_names``, ...).
        """
        return cls(embedding, targets, **config)

    @classmethod
    def from_frame(cls, frame: ActivationFrame, column: str, pooling: str = "mean", *,
                   channel_axis: int | None = None, target_columns: Sequence[str] | None = None,
                   **config: Any) -> "AnalyticsEngine":
        """An engine on one column of an activation frame.

        Parameters
        ----------
        frame, column:
            The frame and the column to analyse (``[N, D]``, ``[N, S, D]``, ``[N, C, H, W]``, ...).
            An unknown column raises ``KeyError`` listing the frame's columns.
        pooling:
            How a column of rank > 2 becomes ``[N, D]``: ``"mean"`` or ``"max"`` over every
            axis but the channel axis (``[N, C, H, W] -> [N, C]``, ``[N, S, D] -> [N, D]``),
            or ``"flatten"`` (``[N, C, H, W] -> [N, C*H*W]``).  Ignored for ``[N, D]`` columns.
        channel_axis:
            The axis kept by ``"mean"``/``"max"``; by default the last axis for rank-3
            columns (``[N, S, D]`` sequences) and axis 1 for rank >= 4 (``[N, C, *spatial]``).
        target_columns:
            Frame columns used as targets; by default ``predictions`` and, when present, ``labels``.
        """
        if not isinstance(frame, ActivationFrame):
            raise AnalyticsError(f"from_frame needs an ActivationFrame, got {type(frame).__name__}; "
                                 "for a plain array use AnalyticsEngine.from_2d_embedding")
        if pooling not in POOLINGS:
            raise AnalyticsError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        values = frame[column]  # KeyError listing the frame's columns when it does not exist
        if target_columns is None:
            if PREDICTIONS not in frame:
                raise KeyError(f"the frame has no {PREDICTIONS!r} column to use as the target; its columns are: "
                               f"{', '.join(frame.columns)}. Pass target_columns=[...] naming class columns")
            target_columns = [name for name in _FRAME_TARGETS if name in frame]
        targets = {name: frame[name] for name in target_columns}
        embedding = pool_features(values, pooling, channel_axis, name=column)
        config.setdefault("name", column if values.ndim <= 2 else f"{column} ({pooling})")
        return cls(embedding, targets, **config)

    # --------------------------------------------------------------- basics

    @property
    def rows(self) -> int:
        """Number of rows (inputs)."""
        return len(self.embedding)

    def classes(self, target_column: str = PREDICTIONS) -> np.ndarray:
        """The class ids that occur in ``target_column``."""
        return np.unique(self._target(target_column))

    def _target(self, target_column: str) -> np.ndarray:
        if target_column not in self.targets:
            present = ", ".join(self.targets) or "none"
            raise KeyError(f"no target {target_column!r}; the engine's targets are: {present}. "
                           "Pass it in targets={...} (or target_columns=[...] with from_frame)")
        return self.targets[target_column]

    def _subsample(self, cap: int | None, salt: int) -> np.ndarray:
        if cap is None or self.rows <= cap:
            return np.arange(self.rows)
        return np.sort(np.random.default_rng((self.seed, salt)).choice(self.rows, cap, replace=False))

    def _view(self, rows: np.ndarray) -> np.ndarray:
        x = self.embedding[rows].astype(np.float64)
        if self.standardize:
            scale = x.std(axis=0)
            x = (x - x.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
        return x

    def _threads(self):
        """Limit native thread pools (OpenMP, BLAS) to ``n_jobs`` while computing."""
        from threadpoolctl import threadpool_limits

        return threadpool_limits(None if self.n_jobs < 0 else self.n_jobs)

    def _label(self, cls: int) -> str:
        if self.class_names is not None and 0 <= cls < len(self.class_names):
            return f"{cls}: {self.class_names[cls]}"
        return str(cls)

    # --------------------------------------------------------------- separability

    def separability(self, k: int = 10, target_column: str = PREDICTIONS) -> Separability:
        """kNN class purity: for each row, the fraction of its ``k`` nearest neighbours
        (Euclidean, itself excluded) whose ``target_column`` class equals its own; the
        mean over rows, and over the rows of each class.

        1.0 means classes sit in pure clumps; about ``sum_c p_c^2`` means no structure.
        Uses a seeded subsample of ``max_knn_rows`` rows when there are more.
        """
        from sklearn.neighbors import NearestNeighbors

        target = self._target(target_column)
        rows = self._subsample(self.max_knn_rows, salt=1)
        if not isinstance(k, (int, np.integer)) or k < 1 or k >= len(rows):
            raise AnalyticsError(f"k must be an integer in [1, {len(rows) - 1}] (fewer than the {len(rows)} rows); "
                                 f"got {k!r}")
        with self._threads():
            neighbours = NearestNeighbors(n_neighbors=k, n_jobs=self.n_jobs).fit(self._view(rows)).kneighbors(
                return_distance=False)  # no query: each row is left out of its own neighbours
        classes = target[rows]
        purity = (classes[neighbours] == classes[:, None]).mean(axis=1)
        per_class = {int(c): float(purity[classes == c].mean()) for c in np.unique(classes)}
        return Separability(float(purity.mean()), per_class, int(k), len(rows), target_column)

    def projection(self, method: str = "pca", max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A 2-D projection of (a seeded subsample of) the rows: ``(points [M, 2], row indices [M])``.

        ``method``: ``"pca"``, ``"tsne"`` (scikit-learn, 500 iterations) or ``"umap"`` (needs
        ``umap-learn``).
        At most ``max_rows`` rows (default: the engine's ``max_plot_rows``) are projected.
        """
        if method not in _PROJECTIONS:
            raise AnalyticsError(f"unknown projection {method!r}; choose one of {', '.join(_PROJECTIONS)}")
        if max_rows is not None and max_rows < 2:
            raise AnalyticsError(f"max_rows must be at least 2, got {max_rows}")
        rows = self._subsample(max_rows or self.max_plot_rows, salt=2)
        with self._threads():
            return self._project(method, self._view(rows)), rows

    def _project(self, method: str, x: np.ndarray) -> np.ndarray:
        if method == "pca":
            from sklearn.decomposition import PCA

            points = PCA(n_components=2, random_state=self.seed).fit_transform(pad2(x))
        elif method == "tsne":
            from sklearn.manifold import TSNE

            if len(x) < 4:
                raise AnalyticsError(f"t-SNE needs at least 4 rows, the engine has {len(x)}")
            perplexity = float(min(30.0, (len(x) - 1) / 3))
            points = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500,
                          random_state=self.seed, n_jobs=self.n_jobs).fit_transform(pad2(x))
        else:
            try:
                import umap
            except ImportError as error:
                raise ImportError("method='umap' needs umap-learn: pip install umap-learn "
                                  "(or use method='pca' or 'tsne')") from error
            points = umap.UMAP(n_components=2, random_state=self.seed).fit_transform(pad2(x))
        return np.asarray(points, np.float64)

    def projection_plot(self, path: str | os.PathLike | None = None, method: str = "pca",
                        target_column: str = PREDICTIONS, max_rows: int | None = None) -> "Figure":
        """Scatter plot of a 2-D projection coloured by ``target_column`` class.

        Returns the matplotlib ``Figure``; with ``path`` also writes it as a PNG
        (atomically). See :meth:`projection` for ``method`` and ``max_rows``.
        """
        target = self._target(target_column)
        points, rows = self.projection(method, max_rows)
        figure, axes = new_figure()
        classes = target[rows]
        colours = class_colours(len(np.unique(target)))
        for position, cls in enumerate(np.unique(target)):
            mine = classes == cls
            axes.scatter(points[mine, 0], points[mine, 1], s=6, alpha=0.7, color=colours[position],
                         label=self._label(int(cls)), linewidths=0)
        axes.set_title(f"{self.name}: {method.upper() if method == 'pca' else method} of {len(rows)} rows, "
                       f"coloured by {target_column}")
        axes.set_xticks([])
        axes.set_yticks([])
        axes.legend(markerscale=2.5, fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
        figure.tight_layout()
        if path is not None:
            save_png(figure, path)
        return figure

    # --------------------------------------------------------------- rules

    def linear_scores(self, target_column: str = PREDICTIONS) -> LinearScores:
        """Per-class linear scores for ``target_column`` fitted on the fit rows (cached).

        One-vs-rest logistic regressions fitted jointly by the compiler's
        :class:`~moco_compile.passes.calibration.rules.OneVsRestRuleFitter`; class ``c``'s score
        is column ``c`` of ``scores(x)``.
        """
        if target_column not in self._scores:
            target = self._target(target_column)
            if len(self.fit_rows_) < 2 or len(self.holdout_rows_) < 1:
                raise AnalyticsError(f"rules need rows to fit and rows to hold out; the engine has {self.rows} "
                                     f"rows ({len(self.fit_rows_)} fit, {len(self.holdout_rows_)} held out)")
            fitter = OneVsRestRuleFitter(self.regularization, self.max_iter)
            self._scores[target_column] = fitter.fit(self.embedding[self.fit_rows_],
                                                     target[self.fit_rows_], int(target.max()) + 1)
        return self._scores[target_column]

    def _check_class(self, target_column: str, cls: Any) -> int:
        target = self._target(target_column)
        if isinstance(cls, (bool, np.bool_)) or not isinstance(cls, (int, np.integer)):
            raise AnalyticsError(f"cls must be an integer class id, got {cls!r}")
        present = np.unique(target)
        if cls not in present:
            raise AnalyticsError(f"class {cls} has no calibration rows in target {target_column!r} "
                                 f"({self.rows} rows; classes present: {', '.join(map(str, present))}); "
                                 "choose a class that occurs, or give calibration data that contains it")
        return int(cls)

    def mlp_scores(self, target_column: str = PREDICTIONS) -> MLPScores:
        """Per-class log-probabilities for ``target_column`` from an MLP head (one hidden ReLU layer,
        the compiler's :class:`~moco_compile.passes.calibration.mlp_head.DistilledMLPFitter`) fitted
        on the fit rows (cached)."""
        if target_column not in self._mlp_scores:
            target = self._target(target_column)
            self.linear_scores(target_column)  # the same row checks
            self._mlp_scores[target_column] = DistilledMLPFitter().fit(
                self.embedding[self.fit_rows_], target[self.fit_rows_], int(target.max()) + 1)
        return self._mlp_scores[target_column]

    def _held_out_scores(self, target_column: str, cls: int,
                         head: str = "linear") -> tuple[LinearCondition | MLPCondition, np.ndarray, np.ndarray]:
        if head == "mlp":
            mlp = self.mlp_scores(target_column)
            condition = MLPCondition(mlp.hidden_weight, mlp.hidden_bias, mlp.weight, mlp.bias, cls, np.inf)
        else:
            scores = self.linear_scores(target_column)
            condition = LinearCondition(scores.weight[:, cls], float(scores.bias[cls]), np.inf)
        held = self.holdout_rows_
        return condition, condition.score(self.embedding[held]), self._target(target_column)[held] == cls

    def compute_linear_sufficient_rule(self, target_column: str = PREDICTIONS, cls: int | None = None,
                                       precision: float = 0.99, confidence: float = 0.95, *,
                                       certify: bool = False) -> SufficientRule:
        """A linear rule that, where it fires, gives ``cls`` in ``target_column`` with ``precision``.

        The linear score of "target == cls" is fitted on the fit rows; the threshold is
        chosen on the held-out rows.  Thresholds are tried in order, strictest first
        (each step fires on one more distinct held-out score), and the search stops
        at the first threshold that fails, so it never jumps over a stretch of thresholds
        that fell short:

        * by default the test is the held-out precision (the fraction of the fired
          held-out rows whose class is ``cls``) reaching ``precision``; the sequence starts
          at the strictest threshold that reaches it.  The rule's held-out precision is at
          least ``precision``, but it is an estimate on the rows that chose the threshold,
          not a guarantee for new rows;
        * with ``certify=True`` the test is the one-sided Clopper-Pearson upper bound of
          the error rate among fired rows staying within ``1 - precision`` at
          ``confidence``, starting where enough rows fire for the bound to be reachable
          (``log(1 - confidence) / log(precision)`` rows, 299 at the defaults).  The claim:
          with probability at least ``confidence`` over the held-out rows, the chosen rule's
          precision (the probability that a new row it fires on is ``cls``, for rows
          exchangeable with the held-out rows: a rate, not the fraction on any given batch)
          is at least ``precision``.  What it rests on, and what it assumes:

          - the score is fitted on the fit rows only, so each real threshold ``t`` is a rule
            fixed before the held-out rows are seen, and the rules, strictest first, are
            nested (each fires on every row a stricter one fires on);
          - the thresholds tried do come from the held-out rows' own scores, but a rule's
            test reads only the rows it fires on, so the search is Bauer's fixed-sequence
            test over every real threshold, strictest first, evaluated where its outcome can
            change, stopping at the first failure; for a fixed threshold the Clopper-Pearson
            test is valid (conservative) given how many rows fire.  Started at the strictest
            threshold, this would bound the chance that any threshold it passes falls short
            by ``1 - confidence``, whatever the shape of the precision curve;
          - but it starts at the first threshold firing on enough rows (testing stricter
            ones would stop it at once), a start the held-out rows choose.  The claim covers
            that when the true precision does not rise as the threshold is lowered
            (monotone precision): the thresholds that fall short are then one stretch at the
            lenient end, and a wrong certificate needs either the stretch's first threshold
            (a fixed rule) or the first threshold tested (given its score, the rows above
            it are an i.i.d. sample from above it, for continuous scores) to pass its level
            ``1 - confidence`` test (the scores alone decide which of the two: at most
            ``1 - confidence`` together).  Monotone precision holds for a score that ranks rows
            by their probability of the class; for a fitted linear score it is an assumption.
            Where precision dips below ``precision`` among the skipped strictest thresholds
            and recovers, the confidence is not proven.

        ``metadata`` (see :class:`SufficientRule`) keeps estimates and bounds apart:
        ``held_out_precision``, ``coverage`` and ``class_coverage`` are point estimates on
        the held-out rows (optimistic by default, since the same rows chose the threshold);
        ``precision_lower_bound`` is the one-sided Clopper-Pearson lower confidence bound
        of the precision at ``confidence`` from the rule's fired held-out rows; ``certified``
        is True when ``required_precision`` itself is certified (``certify=True``, and then
        ``precision_lower_bound >= required_precision``).

        Raises :class:`NoRuleError` when no threshold passes (the rule would fire on no
        row), and :class:`AnalyticsError` when ``cls`` has no rows.
        """
        return self._sufficient_rule("linear", target_column, cls, precision, confidence, certify)

    def compute_mlp_sufficient_rule(self, target_column: str = PREDICTIONS, cls: int | None = None,
                                    precision: float = 0.99, confidence: float = 0.95, *,
                                    certify: bool = False) -> SufficientRule:
        """The sibling of :meth:`compute_linear_sufficient_rule` with the compiler's richer exit head: the
        rule fires where an MLP head's log-probability of ``cls`` (:meth:`mlp_scores`, fitted on the fit
        rows only) exceeds a threshold chosen on the held-out rows exactly as there, with the same
        estimates, bound and certificate (the condition is an :class:`MLPCondition`).  Where the
        classes are not linearly separable at the cut it fires on more rows at the same precision."""
        return self._sufficient_rule("mlp", target_column, cls, precision, confidence, certify)

    def _sufficient_rule(self, head: str, target_column: str, cls: int | None, precision: float,
                         confidence: float, certify: bool) -> SufficientRule:
        """The rule of ``head``'s scores (see :meth:`compute_linear_sufficient_rule`)."""
        if cls is None:
            raise AnalyticsError("pass cls=<class id> (the class the rule should reach the precision for)")
        if not 0 < precision < 1:
            raise AnalyticsError(f"precision must be in (0, 1), got {precision}")
        if not 0 < confidence < 1:
            raise AnalyticsError(f"confidence must be in (0, 1), got {confidence}")
        cls = self._check_class(target_column, cls)
        condition, scores, hits = self._held_out_scores(target_column, cls, head)
        table = threshold_table(scores, hits)
        class_rows = int(hits.sum())
        if certify:
            chosen = last_certified(table["fired"], table["errors"], precision, confidence)
        else:
            chosen = last_precise(table["fired"], table["errors"], precision)
        if chosen < 0:
            raise NoRuleError(
                f"no {head} rule for class {cls} of {target_column!r} at {self.name} reaches precision "
                f"{precision:g}" + (f" certified at confidence {confidence:g}" if certify else " on the held-out rows")
                + f": the rule would fire on no row ({self._no_rule_reason(hits, precision, confidence, certify)}). "
                + ("Drop certify=True to get the rule that reaches the precision on the held-out rows, ask for a "
                   "lower precision or confidence, give more calibration rows, or use a later cut" if certify else
                   "Ask for a lower precision, give more calibration rows, or use a later cut"))
        condition.threshold = table["thresholds"][chosen]
        fired, errors = int(table["fired"][chosen]), int(table["errors"][chosen])
        metadata = {
            "class": cls,
            "class_name": self.class_names[cls] if self.class_names and cls < len(self.class_names) else None,
            "target_column": target_column,
            "feature": self.name,
            "coverage": fired / len(hits),
            "class_coverage": (fired - errors) / max(class_rows, 1),
            "held_out_precision": (fired - errors) / fired,
            "precision_lower_bound": 1 - clopper_pearson_upper(errors, fired, confidence),
            "required_precision": precision,
            "confidence": confidence,
            "certified": certify,
            "rows": len(hits),
            "fired_rows": fired,
            "errors": errors,
            "fit_rows": len(self.fit_rows_),
            "method": _HEAD_METHODS[head] + " on the fit rows; threshold: the last of a "
                      "fixed sequence on the held-out rows, strictest first, " +
                      ("whose one-sided Clopper-Pearson test certifies the precision" if certify else
                       "whose held-out precision reaches the precision (not certified)"),
        }
        return SufficientRule(condition, metadata)

    def _no_rule_reason(self, hits: np.ndarray, precision: float, confidence: float, certify: bool) -> str:
        """Why no threshold passed, for :class:`NoRuleError`."""
        class_rows = int(hits.sum())
        if not certify:
            if class_rows == 0:
                return f"none of the {len(hits)} held-out rows is of the class"
            return (f"at every threshold more than {1 - precision:.2%} of the fired held-out rows (of "
                    f"{len(hits)}) are of other classes")
        minimum = rows_needed(1 - precision, confidence)
        if class_rows < minimum:
            return (f"only {class_rows} of the {len(hits)} held-out rows are the class; certifying precision "
                    f"{precision:g} at confidence {confidence:g} needs at least {minimum} fired rows even with "
                    "no error")
        return (f"among the {class_rows} held-out rows of the class, no threshold firing on at least {minimum} "
                f"rows (the fewest for which the bound can reach {precision:g}) kept the error rate's "
                f"{confidence:.0%} upper bound within {1 - precision:g}")

    def coverage_precision_curve(self, target_column: str = PREDICTIONS, cls: int | None = None,
                                 confidence: float = 0.95) -> dict[int, CoveragePrecisionCurve]:
        """Held-out coverage vs precision of each class's linear score as its threshold is lowered.

        Returns ``{class: CoveragePrecisionCurve}`` for every class of ``target_column``
        (or only ``cls``).  Points run from the strictest threshold (one fired tie group)
        to the loosest (every held-out row fired).
        """
        if not 0 < confidence < 1:
            raise AnalyticsError(f"confidence must be in (0, 1), got {confidence}")
        classes = self.classes(target_column) if cls is None else [self._check_class(target_column, cls)]
        curves = {}
        for c in classes:
            _, scores, hits = self._held_out_scores(target_column, int(c))
            table = threshold_table(scores, hits)
            fired, errors = table["fired"], table["errors"]
            curves[int(c)] = CoveragePrecisionCurve(
                int(c), table["thresholds"], fired / len(hits), (fired - errors) / max(int(hits.sum()), 1),
                (fired - errors) / fired, 1 - clopper_pearson_upper(errors, fired, confidence), confidence)
        return curves

    def plot_coverage_precision(self, path: str | os.PathLike | None = None, target_column: str = PREDICTIONS,
                                classes: Sequence[int] | None = None, confidence: float = 0.95) -> "Figure":
        """Coverage (of each class's held-out rows) vs precision, one line per class, with the
        Clopper-Pearson lower bound dashed.  Returns the ``Figure``; writes a PNG at ``path``."""
        if classes is None:
            curves = self.coverage_precision_curve(target_column, confidence=confidence)
        else:
            curves = {}
            for c in classes:
                curves.update(self.coverage_precision_curve(target_column, c, confidence))
        figure, axes = new_figure()
        colours = class_colours(len(curves))
        for colour, (c, curve) in zip(colours, curves.items()):
            axes.plot(curve.class_coverage, curve.precision, color=colour, label=self._label(c), linewidth=1.2)
            axes.plot(curve.class_coverage, curve.precision_lower_bound, color=colour, linestyle="--",
                      linewidth=0.8)
        axes.set_xlabel("coverage (fraction of the class's held-out rows the rule fires on)")
        axes.set_ylabel(f"precision (dashed: {confidence:.0%} lower bound)")
        axes.set_xlim(0, 1)
        # the informative range: precision up to 95% class coverage (the bounds of the first few
        # fired rows and the all-rows end of each curve would squash it)
        body = [c.precision[c.class_coverage <= 0.95] for c in curves.values()]
        bottom = min((float(p.min()) for p in body if len(p)), default=0.0)
        axes.set_ylim(max(0.0, bottom - 0.02), 1.005)
        axes.set_title(f"{self.name}: linear rules for {target_column} ({len(self.holdout_rows_)} held-out rows)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
        figure.tight_layout()
        if path is not None:
            save_png(figure, path)
        return figure

    def __repr__(self) -> str:
        return (f"AnalyticsEngine({self.name!r}: {self.rows} rows x {self.embedding.shape[1]} features; "
                f"targets: {', '.join(self.targets) or 'none'})")


def separability_by_cut(frame: ActivationFrame, columns: Sequence[str] | None = None, k: int = 10,
                        pooling: str = "mean", target_column: str = PREDICTIONS,
                        **config: Any) -> dict[str, Separability]:
    """kNN purity of ``target_column`` at several frame columns (default: every non-scalar column).

    ``pooling`` and ``config`` are passed to :meth:`AnalyticsEngine.from_frame`.
    """
    if columns is None:
        columns = [name for name in frame.columns if frame.row_shape(name)]
    return {column: AnalyticsEngine.from_frame(frame, column, pooling, **config).separability(k, target_column)
            for column in columns}


