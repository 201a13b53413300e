"""Training, evaluation and inference behind ``emcad train / evaluate / predict / bench``.

``TrainConfig`` + ``train`` (:mod:`.trainer`), atomic checkpoints with exact resume (:mod:`.checkpoint`,
:mod:`.sampler`), DDP helpers and a CPU-capable SyncBatchNorm (:mod:`.distributed`), inference helpers
(:mod:`.evaluation`, :mod:`.inference`), PNG figures (:mod:`.plotting`) and the benchmark (:mod:`.bench`).
"""

from .trainer import TrainConfig, TrainError, TrainResult, Trainer, build_datasets, train

__all__ = ["TrainConfig", "TrainError", "TrainResult", "Trainer", "build_datasets", "train"]
