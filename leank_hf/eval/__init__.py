"""Evaluating masks against the full cache (`evaluate`, `EvaluationArguments`): the metrics, the prose, the
retrieval tasks, the RULER-style suite (`evaluate_ruler`), and the tables and plots of the results."""

from .evaluation import BASELINES, FULL_CACHE, EvaluationArguments, evaluate, standard_methods
from .report import accuracy_png, format_ruler_table, format_table, plot_accuracy, plot_ruler, ruler_png
from .retrieval import MIXTURES, RetrievalDataset, RetrievalExample, make_retrieval_dataset
from .ruler import RULER_FAMILIES, evaluate_ruler, make_ruler_suite

__all__ = [
    "BASELINES",
    "FULL_CACHE",
    "MIXTURES",
    "RULER_FAMILIES",
    "EvaluationArguments",
    "RetrievalDataset",
    "RetrievalExample",
    "accuracy_png",
    "evaluate",
    "evaluate_ruler",
    "format_ruler_table",
    "format_table",
    "make_retrieval_dataset",
    "make_ruler_suite",
    "plot_accuracy",
    "plot_ruler",
    "ruler_png",
    "standard_methods",
]
