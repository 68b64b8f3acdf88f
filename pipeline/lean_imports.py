"""Imports that cost what is used: scikit-learn without pandas, skops.io without importing every estimator.

Two libraries load far more than cnncodes uses, in every process that fits or loads a head:
- sklearn.utils.fixes imports pandas "to have it at hand" (its module-level `pd` is used nowhere):
  0.6 CPU-s. Here that one module runs as if pandas were absent; scikit-learn recognises
  DataFrames by looking pandas up in sys.modules, so a pandas that anything else imports still works.
- skops.io lists its default trusted types when imported, with sklearn.utils.all_estimators(),
  which imports every module of scikit-learn: 1.6 CPU-s. For the scikit-learn version in
  SKLEARN_VERSION the list is the snapshot ESTIMATOR_TYPE_NAMES below (tests/test_lean_imports.py
  checks it against skops' own list, computed in a fresh process); any other version takes skops'
  own slow path. Only the type names are read: no estimator is imported or trusted because of this.
scipy.stats stays: sklearn._loss.link (logistic regression) and sklearn.metrics import functions
from it at their top.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

SKLEARN_VERSION = "1.9.1"  # the version ESTIMATOR_TYPE_NAMES was taken from (skops 0.16)


class _WithoutPandas(importlib.abc.Loader):
    """Runs a module's loader with `import pandas` failing, unless pandas is loaded already."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if "pandas" in sys.modules:
            return self.loader.exec_module(module)
        sys.modules["pandas"] = None  # type: ignore[assignment]  # `import pandas` raises ImportError
        try:
            self.loader.exec_module(module)
        finally:
            if sys.modules.get("pandas", 0) is None:
                del sys.modules["pandas"]


class _SklearnFixesFinder(importlib.abc.MetaPathFinder):
    """Finds sklearn.utils.fixes as usual and hands it to _WithoutPandas."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "sklearn.utils.fixes":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _WithoutPandas(spec.loader)
        return spec


def install() -> None:
    """Put the pandas-free loading of sklearn.utils.fixes in place (once; nothing when sklearn is loaded)."""
    if "sklearn.utils.fixes" not in sys.modules and not any(isinstance(f, _SklearnFixesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SklearnFixesFinder())


def _named_type(type_name: str) -> type:
    """A stand-in class that skops names type_name (its get_type_name reads __module__ and __name__)."""
    module, _, name = type_name.rpartition(".")
    return type(name, (), {"__module__": module})


def import_skops_io() -> ModuleType:
    """skops.io, its trusted estimator list taken from ESTIMATOR_TYPE_NAMES when scikit-learn's version matches."""
    if "skops.io" in sys.modules:
        return sys.modules["skops.io"]
    import sklearn
    import sklearn.utils

    if sklearn.__version__ != SKLEARN_VERSION:
        import skops.io

        return skops.io
    real = sklearn.utils.all_estimators
    sklearn.utils.all_estimators = lambda *args, **kwargs: [(n.rpartition(".")[2], _named_type(n))
                                                             for n in ESTIMATOR_TYPE_NAMES]
    try:
        import skops.io
    finally:
        sklearn.utils.all_estimators = real
    return skops.io


# skops.io._trusted_types.SKLEARN_ESTIMATOR_TYPE_NAMES for scikit-learn SKLEARN_VERSION, in its order
ESTIMATOR_TYPE_NAMES = (
    "sklearn.linear_model._bayes.ARDRegression",
    "sklearn.ensemble._weight_boosting.AdaBoostClassifier",
    "sklearn.ensemble._weight_boosting.AdaBoostRegressor",
    "sklearn.kernel_approximation.AdditiveChi2Sampler",
    "sklearn.cluster._affinity_propagation.AffinityPropagation",
    "sklearn.cluster._agglomerative.AgglomerativeClustering",
    "sklearn.ensemble._bagging.BaggingClassifier",
    "sklearn.ensemble._bagging.BaggingRegressor",
    "sklearn.mixture._bayesian_mixture.BayesianGaussianMixture",
    "sklearn.linear_model._bayes.BayesianRidge",
    "sklearn.naive_bayes.BernoulliNB",
    "sklearn.neural_network._rbm.BernoulliRBM",
    "sklearn.preprocessing._data.Binarizer",
    "sklearn.cluster._birch.Birch",
    "sklearn.cluster._bisect_k_means.BisectingKMeans",
    "sklearn.cross_decomposition._pls.CCA",
    "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.naive_bayes.CategoricalNB",
    "sklearn.manifold._classical_mds.ClassicalMDS",
    "sklearn.multioutput.ClassifierChain",
    "sklearn.compose._column_transformer.ColumnTransformer",
    "sklearn.naive_bayes.ComplementNB",
    "sklearn.feature_extraction.text.CountVectorizer",
    "sklearn.cluster._dbscan.DBSCAN",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._classes.DecisionTreeRegressor",
    "sklearn.feature_extraction._dict_vectorizer.DictVectorizer",
    "sklearn.decomposition._dict_learning.DictionaryLearning",
    "sklearn.dummy.DummyClassifier",
    "sklearn.dummy.DummyRegressor",
    "sklearn.linear_model._coordinate_descent.ElasticNet",
    "sklearn.linear_model._coordinate_descent.ElasticNetCV",
    "sklearn.covariance._elliptic_envelope.EllipticEnvelope",
    "sklearn.covariance._empirical_covariance.EmpiricalCovariance",
    "sklearn.tree._classes.ExtraTreeClassifier",
    "sklearn.tree._classes.ExtraTreeRegressor",
    "sklearn.ensemble._forest.ExtraTreesClassifier",
    "sklearn.ensemble._forest.ExtraTreesRegressor",
    "sklearn.decomposition._factor_analysis.FactorAnalysis",
    "sklearn.decomposition._fastica.FastICA",
    "sklearn.cluster._agglomerative.FeatureAgglomeration",
    "sklearn.feature_extraction._hash.FeatureHasher",
    "sklearn.pipeline.FeatureUnion",
    "sklearn.model_selection._classification_threshold.FixedThresholdClassifier",
    "sklearn.frozen._frozen.FrozenEstimator",
    "sklearn.preprocessing._function_transformer.FunctionTransformer",
    "sklearn.linear_model._glm.glm.GammaRegressor",
    "sklearn.mixture._gaussian_mixture.GaussianMixture",
    "sklearn.naive_bayes.GaussianNB",
    "sklearn.gaussian_process._gpc.GaussianProcessClassifier",
    "sklearn.gaussian_process._gpr.GaussianProcessRegressor",
    "sklearn.random_projection.GaussianRandomProjection",
    "sklearn.feature_selection._univariate_selection.GenericUnivariateSelect",
    "sklearn.ensemble._gb.GradientBoostingClassifier",
    "sklearn.ensemble._gb.GradientBoostingRegressor",
    "sklearn.covariance._graph_lasso.GraphicalLasso",
    "sklearn.covariance._graph_lasso.GraphicalLassoCV",
    "sklearn.model_selection._search.GridSearchCV",
    "sklearn.cluster._hdbscan.hdbscan.HDBSCAN",
    "sklearn.feature_extraction.text.HashingVectorizer",
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingRegressor",
    "sklearn.linear_model._huber.HuberRegressor",
    "sklearn.decomposition._incremental_pca.IncrementalPCA",
    "sklearn.ensemble._iforest.IsolationForest",
    "sklearn.manifold._isomap.Isomap",
    "sklearn.isotonic.IsotonicRegression",
    "sklearn.preprocessing._discretization.KBinsDiscretizer",
    "sklearn.cluster._kmeans.KMeans",
    "sklearn.impute._knn.KNNImputer",
    "sklearn.neighbors._classification.KNeighborsClassifier",
    "sklearn.neighbors._regression.KNeighborsRegressor",
    "sklearn.neighbors._graph.KNeighborsTransformer",
    "sklearn.preprocessing._data.KernelCenterer",
    "sklearn.neighbors._kde.KernelDensity",
    "sklearn.decomposition._kernel_pca.KernelPCA",
    "sklearn.kernel_ridge.KernelRidge",
    "sklearn.preprocessing._label.LabelBinarizer",
    "sklearn.preprocessing._label.LabelEncoder",
    "sklearn.semi_supervised._label_propagation.LabelPropagation",
    "sklearn.semi_supervised._label_propagation.LabelSpreading",
    "sklearn.linear_model._least_angle.Lars",
    "sklearn.linear_model._least_angle.LarsCV",
    "sklearn.linear_model._coordinate_descent.Lasso",
    "sklearn.linear_model._coordinate_descent.LassoCV",
    "sklearn.linear_model._least_angle.LassoLars",
    "sklearn.linear_model._least_angle.LassoLarsCV",
    "sklearn.linear_model._least_angle.LassoLarsIC",
    "sklearn.decomposition._lda.LatentDirichletAllocation",
    "sklearn.covariance._shrunk_covariance.LedoitWolf",
    "sklearn.discriminant_analysis.LinearDiscriminantAnalysis",
    "sklearn.linear_model._base.LinearRegression",
    "sklearn.svm._classes.LinearSVC",
    "sklearn.svm._classes.LinearSVR",
    "sklearn.neighbors._lof.LocalOutlierFactor",
    "sklearn.manifold._locally_linear.LocallyLinearEmbedding",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.linear_model._logistic.LogisticRegressionCV",
    "sklearn.manifold._mds.MDS",
    "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
    "sklearn.neural_network._multilayer_perceptron.MLPRegressor",
    "sklearn.preprocessing._data.MaxAbsScaler",
    "sklearn.cluster._mean_shift.MeanShift",
    "sklearn.covariance._robust_covariance.MinCovDet",
    "sklearn.preprocessing._data.MinMaxScaler",
    "sklearn.decomposition._dict_learning.MiniBatchDictionaryLearning",
    "sklearn.cluster._kmeans.MiniBatchKMeans",
    "sklearn.decomposition._nmf.MiniBatchNMF",
    "sklearn.decomposition._sparse_pca.MiniBatchSparsePCA",
    "sklearn.impute._base.MissingIndicator",
    "sklearn.preprocessing._label.MultiLabelBinarizer",
    "sklearn.multioutput.MultiOutputClassifier",
    "sklearn.multioutput.MultiOutputRegressor",
    "sklearn.linear_model._coordinate_descent.MultiTaskElasticNet",
    "sklearn.linear_model._coordinate_descent.MultiTaskElasticNetCV",
    "sklearn.linear_model._coordinate_descent.MultiTaskLasso",
    "sklearn.linear_model._coordinate_descent.MultiTaskLassoCV",
    "sklearn.naive_bayes.MultinomialNB",
    "sklearn.decomposition._nmf.NMF",
    "sklearn.neighbors._nearest_centroid.NearestCentroid",
    "sklearn.neighbors._unsupervised.NearestNeighbors",
    "sklearn.neighbors._nca.NeighborhoodComponentsAnalysis",
    "sklearn.preprocessing._data.Normalizer",
    "sklearn.svm._classes.NuSVC",
    "sklearn.svm._classes.NuSVR",
    "sklearn.kernel_approximation.Nystroem",
    "sklearn.covariance._shrunk_covariance.OAS",
    "sklearn.cluster._optics.OPTICS",
    "sklearn.svm._classes.OneClassSVM",
    "sklearn.preprocessing._encoders.OneHotEncoder",
    "sklearn.multiclass.OneVsOneClassifier",
    "sklearn.multiclass.OneVsRestClassifier",
    "sklearn.preprocessing._encoders.OrdinalEncoder",
    "sklearn.linear_model._omp.OrthogonalMatchingPursuit",
    "sklearn.linear_model._omp.OrthogonalMatchingPursuitCV",
    "sklearn.multiclass.OutputCodeClassifier",
    "sklearn.decomposition._pca.PCA",
    "sklearn.cross_decomposition._pls.PLSCanonical",
    "sklearn.cross_decomposition._pls.PLSRegression",
    "sklearn.cross_decomposition._pls.PLSSVD",
    "sklearn.linear_model._passive_aggressive.PassiveAggressiveClassifier",
    "sklearn.linear_model._passive_aggressive.PassiveAggressiveRegressor",
    "sklearn.feature_extraction.image.PatchExtractor",
    "sklearn.linear_model._perceptron.Perceptron",
    "sklearn.pipeline.Pipeline",
    "sklearn.linear_model._glm.glm.PoissonRegressor",
    "sklearn.kernel_approximation.PolynomialCountSketch",
    "sklearn.preprocessing._polynomial.PolynomialFeatures",
    "sklearn.preprocessing._data.PowerTransformer",
    "sklearn.discriminant_analysis.QuadraticDiscriminantAnalysis",
    "sklearn.linear_model._quantile.QuantileRegressor",
    "sklearn.preprocessing._data.QuantileTransformer",
    "sklearn.linear_model._ransac.RANSACRegressor",
    "sklearn.kernel_approximation.RBFSampler",
    "sklearn.feature_selection._rfe.RFE",
    "sklearn.feature_selection._rfe.RFECV",
    "sklearn.neighbors._classification.RadiusNeighborsClassifier",
    "sklearn.neighbors._regression.RadiusNeighborsRegressor",
    "sklearn.neighbors._graph.RadiusNeighborsTransformer",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.ensemble._forest.RandomForestRegressor",
    "sklearn.ensemble._forest.RandomTreesEmbedding",
    "sklearn.model_selection._search.RandomizedSearchCV",
    "sklearn.multioutput.RegressorChain",
    "sklearn.linear_model._ridge.Ridge",
    "sklearn.linear_model._ridge.RidgeCV",
    "sklearn.linear_model._ridge.RidgeClassifier",
    "sklearn.linear_model._ridge.RidgeClassifierCV",
    "sklearn.preprocessing._data.RobustScaler",
    "sklearn.linear_model._stochastic_gradient.SGDClassifier",
    "sklearn.linear_model._stochastic_gradient.SGDOneClassSVM",
    "sklearn.linear_model._stochastic_gradient.SGDRegressor",
    "sklearn.svm._classes.SVC",
    "sklearn.svm._classes.SVR",
    "sklearn.feature_selection._univariate_selection.SelectFdr",
    "sklearn.feature_selection._univariate_selection.SelectFpr",
    "sklearn.feature_selection._from_model.SelectFromModel",
    "sklearn.feature_selection._univariate_selection.SelectFwe",
    "sklearn.feature_selection._univariate_selection.SelectKBest",
    "sklearn.feature_selection._univariate_selection.SelectPercentile",
    "sklearn.semi_supervised._self_training.SelfTrainingClassifier",
    "sklearn.feature_selection._sequential.SequentialFeatureSelector",
    "sklearn.covariance._shrunk_covariance.ShrunkCovariance",
    "sklearn.impute._base.SimpleImputer",
    "sklearn.kernel_approximation.SkewedChi2Sampler",
    "sklearn.decomposition._dict_learning.SparseCoder",
    "sklearn.decomposition._sparse_pca.SparsePCA",
    "sklearn.random_projection.SparseRandomProjection",
    "sklearn.cluster._bicluster.SpectralBiclustering",
    "sklearn.cluster._spectral.SpectralClustering",
    "sklearn.cluster._bicluster.SpectralCoclustering",
    "sklearn.manifold._spectral_embedding.SpectralEmbedding",
    "sklearn.preprocessing._polynomial.SplineTransformer",
    "sklearn.ensemble._stacking.StackingClassifier",
    "sklearn.ensemble._stacking.StackingRegressor",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.manifold._t_sne.TSNE",
    "sklearn.preprocessing._target_encoder.TargetEncoder",
    "sklearn.feature_extraction.text.TfidfTransformer",
    "sklearn.feature_extraction.text.TfidfVectorizer",
    "sklearn.linear_model._theil_sen.TheilSenRegressor",
    "sklearn.compose._target.TransformedTargetRegressor",
    "sklearn.decomposition._truncated_svd.TruncatedSVD",
    "sklearn.model_selection._classification_threshold.TunedThresholdClassifierCV",
    "sklearn.linear_model._glm.glm.TweedieRegressor",
    "sklearn.feature_selection._variance_threshold.VarianceThreshold",
    "sklearn.ensemble._voting.VotingClassifier",
    "sklearn.ensemble._voting.VotingRegressor",
)
