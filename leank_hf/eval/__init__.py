"""Evaluating masks against the full cache (`evaluate`, `EvaluationArguments`): the metrics, the prose, the
retrieval tasks, and the table and plot of the results."""

from .evaluation import BASELINES, FULL_CACHE, EvaluationArguments, evaluate, standard_methods
from .report import accuracy_png, format_table, plot_accuracy
from .retrieval import RetrievalDataset, RetrievalExample, make_retrieval_dataset

__all__ = [
    "BASELINES",
    "FULL_CACHE",
    "EvaluationArguments",
    "RetrievalDataset",
    "RetrievalExample",
    "accuracy_png",
    "evaluate",
    "format_table",
    "make_retrieval_dataset",
    "plot_accuracy",
    "standard_methods",
]
