"""The GRASP surrogate, its LCB hyperparameter protocol, the baselines and the evaluation.

Pure numpy (float64) functions of arrays; no file I/O. The stage glue reads the
sketches and retraining results, calls ``compute_subset_features`` (one pass over
the sketch array), ``split_by_role`` and ``run_protocol``, and writes the rows
and ``surrogate.params()`` / ``surrogate.to_arrays()`` out.
"""

from grasp_cli.surrogate.baselines import (
    ConstantBaseline,
    Datamodels,
    DomainMixture,
    GradientCosine,
    TrakBaseline,
)
from grasp_cli.surrogate.features import (
    CorpusMoments,
    SubsetFeatures,
    compute_subset_features,
    dense_membership,
)
from grasp_cli.surrogate.gains import (
    ExampleGains,
    example_gains,
    surrogate_gains,
)
from grasp_cli.surrogate.geometry import GEOMETRIES, geometry_matrix, sq_norm
from grasp_cli.surrogate.lcb import (
    CandidateScore,
    choose_candidate,
    hoeffding_lcb,
    repeated_kfold,
    score_candidates,
)
from grasp_cli.surrogate.metrics import bootstrap_correlations, pearson, rank_columns, spearman
from grasp_cli.surrogate.model import (
    AGGREGATIONS,
    GraspSurrogate,
    check_utilities,
    float_from_json,
    float_to_json,
    subset_aggregates,
)
from grasp_cli.surrogate.protocol import (
    MethodFit,
    MethodSpec,
    ProtocolResult,
    ProtocolSettings,
    baseline_specs,
    cost_curve,
    evaluate_methods,
    fit_method,
    fit_methods,
    grasp_spec,
    run_protocol,
    split_by_role,
)

__all__ = [
    "AGGREGATIONS",
    "GEOMETRIES",
    "CandidateScore",
    "ConstantBaseline",
    "CorpusMoments",
    "Datamodels",
    "DomainMixture",
    "ExampleGains",
    "GradientCosine",
    "GraspSurrogate",
    "MethodFit",
    "MethodSpec",
    "ProtocolResult",
    "ProtocolSettings",
    "SubsetFeatures",
    "TrakBaseline",
    "baseline_specs",
    "bootstrap_correlations",
    "check_utilities",
    "choose_candidate",
    "compute_subset_features",
    "cost_curve",
    "dense_membership",
    "evaluate_methods",
    "example_gains",
    "fit_method",
    "fit_methods",
    "float_from_json",
    "float_to_json",
    "geometry_matrix",
    "grasp_spec",
    "hoeffding_lcb",
    "pearson",
    "rank_columns",
    "repeated_kfold",
    "run_protocol",
    "score_candidates",
    "spearman",
    "split_by_role",
    "sq_norm",
    "subset_aggregates",
    "surrogate_gains",
]
