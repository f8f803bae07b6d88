"""Training engine: the one trainer (θ0 and every retrain), task evaluation, and vmapped multi-model training."""

from grasp_cli.train.evaluate import evaluate_tasks
from grasp_cli.train.parallel import evaluate_many, train_many
from grasp_cli.train.trainer import TrainRecipe, TrainResult, batch_rows, train

__all__ = [
    "TrainRecipe",
    "TrainResult",
    "batch_rows",
    "evaluate_many",
    "evaluate_tasks",
    "train",
    "train_many",
]
