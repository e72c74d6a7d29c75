"""Training engine: InternEvo-style configs, the packed training loop, checkpoints, metrics, generation; the causal
LM task (LLaVA and Flux runs build on the engine: :func:`seqpack.tasks.train` picks a config's task).

    from seqpack.train import load_config, train
    result = train(load_config("configs/demo.py", ["--train.max_steps", "20"]))

Files: config.py (typed settings), config_diffusion.py (the ``diffusion`` section), config_load.py (file, overrides,
type checks), config_rules.py (InternEvo keys ignored / rejected), task.py (what the loop asks a task for; the
causal LM task), model.py (build + parallelise the model), setup.py (tokenizer, loader), loop.py (the loop),
checkpoint.py (atomic DCP checkpoints, HF export), metrics.py (jsonl / TensorBoard / progress / loss.png), cli.py
(``seqpack train``), generate.py (``seqpack generate``).
"""

from .config import Config
from .config_load import load_config
from .guard import TrainingStopped
from .loop import TrainingDiverged, TrainResult, train

__all__ = ["Config", "TrainResult", "TrainingDiverged", "TrainingStopped", "load_config", "train"]
