"""The kinds of run ``seqpack train`` knows, and the one place that picks one for a config.

    from seqpack.tasks import train
    from seqpack.train import load_config
    result = train(load_config("configs/flux_demo.py"))     # Flux task; a LLaVA folder: LLaVA task; else causal LM

The training engine (:mod:`seqpack.train`) knows no task by name: it asks the task it is given for the model, the
loader, the step and the export (:mod:`seqpack.train.task`). The tasks build on the engine; this module imports
both and sits above them, with the ``seqpack train`` command.
"""

from __future__ import annotations

import argparse

from .diffusion.task import Flux
from .multimodal.task import Llava, is_multimodal_run
from .train import cli
from .train.config import Config
from .train.config_diffusion import is_flux
from .train.loop import TrainResult
from .train.loop import train as train_with
from .train.task import CausalLM


def select_task(cfg: Config) -> CausalLM | Llava | Flux:
    """The task of ``cfg``: Flux for ``model_type="flux"``, LLaVA for a vision-language model folder, else the
    causal LM."""
    if is_flux(cfg):
        return Flux()
    if is_multimodal_run(cfg):
        return Llava()
    return CausalLM()


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the job ``cfg`` describes with its task (:func:`select_task`); one process or every rank of
    a torchrun launch."""
    return train_with(cfg, select_task(cfg))


add_arguments = cli.add_arguments  # ``seqpack train``: its arguments are the engine's (config keys)
parse_args = cli.parse_args


def run(args: argparse.Namespace) -> int:
    """``seqpack train``: :func:`seqpack.train.cli.run` with the run's task picked here."""
    return cli.run(args, select_task)
