"""Learn LeanK masks with a stock `transformers.Trainer`: a frozen model with trainable key-channel scales
(`prepare_for_mask_learning`), the two-stage schedule (`LeanKMaskCallback`) and long retrieval data
(`make_retrieval_dataset`)."""

from ..eval.retrieval import RetrievalDataset, RetrievalExample, make_retrieval_dataset
from .callback import LeanKMaskCallback
from .learner import MaskLearner, MaskLearnerOutput, prepare_for_mask_learning

__all__ = [
    "LeanKMaskCallback",
    "MaskLearner",
    "MaskLearnerOutput",
    "RetrievalDataset",
    "RetrievalExample",
    "make_retrieval_dataset",
    "prepare_for_mask_learning",
]
