"""``ttadapt finetune``: fine-tune a zoo model with a plain optimizer, AG-1, AG-2, AG-3, AG-3-1 or
SAM — one process or many (``torchrun`` / DistributedDataParallel), with atomic checkpoints and exact resume.

    from ttadapt.finetune import load_finetune_config, finetune
    config = load_finetune_config("recipes/resnet152_imagenet_ood_ag3.yaml", ["optim.lr=1e-3"])
    result = finetune(config)                      # or finetune(config, resume=True)

What a run writes into ``config.out`` (rank 0 only): ``config.yaml`` (the resolved config),
``log.txt``, ``metrics.jsonl`` (one line per evaluation), ``checkpoint.pt`` (every
``checkpoint_every`` steps and at the end, replaced atomically: model, optimizer wrapper with
AG-3's anchors, scheduler, every rank's RNG state, data position, history) and ``model.pt`` (the
final weights as a zoo checkpoint, usable as ``--weights`` elsewhere).

Exact resume: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, random
augmentations of sample ``i`` in epoch ``e`` are seeded by ``(seed, e, i)`` (so they do not
depend on worker processes or on where a run was interrupted), the data loaders never draw from
the global RNG, and the checkpoint holds the RNG states (dropout). A run interrupted after a
checkpoint and resumed with ``resume=True`` ends with the same parameters, bit for bit, as an
uninterrupted one (same world size, CPU or deterministic kernels).

``data.batch_size`` is the global batch: with N processes each takes ``batch_size / N`` samples
of the same global batch a single process would take, so a recipe means the same on any number
of GPUs. AG-3 under DDP runs its no-graph anchor pass on the unwrapped module and its graph pass
through the DDP wrapper, so the reducer averages the averaged gradient across ranks; SAM's and
AG-1/AG-2's two gradients are all-reduced explicitly (the perturbation, the forecast and the
averaged gradient are those of the global batch) and the model is not wrapped, so each rank keeps its own BatchNorm running statistics (rank 0's are saved).
"""

from .config import (METHODS, DataConfig, FinetuneConfig, MethodConfig, ModelConfig, OptimConfig, ScheduleConfig,
                     load_finetune_config)
from .data import EpochSampler
from .run import RUN_FORMAT, FinetuneResult, finetune, read_checkpoint

__all__ = ["FinetuneConfig", "ModelConfig", "DataConfig", "OptimConfig", "MethodConfig", "ScheduleConfig",
           "load_finetune_config", "finetune", "FinetuneResult", "read_checkpoint", "EpochSampler", "RUN_FORMAT", "METHODS"]
