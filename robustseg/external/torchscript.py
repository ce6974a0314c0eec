"""Compiled model files: TorchScript (``torch.jit.save``) and ``torch.export`` programs (``torch.export.save``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from robustseg.errors import CheckpointError


def load_torchscript(path: Path) -> nn.Module:
    """A TorchScript archive on the CPU; a file that is not one fails naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 points at torch.export; both load
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable TorchScript archive ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "write it with torch.jit.script(model).save(path) or torch.jit.trace(...).save(path)"
        ) from err


class FixedBatch(nn.Module):
    """Runs a program exported with a static batch size ``batch`` on any batch: chunks, the last one zero-padded."""

    def __init__(self, program: nn.Module, batch: int) -> None:
        super().__init__()
        self.program = program
        self.batch = batch

    def train(self, mode: bool = True) -> FixedBatch:
        self.training = mode  # exported programs refuse mode switches: they keep the mode they were exported in
        return self

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        for start in range(0, x.shape[0], self.batch):
            chunk = x[start : start + self.batch]  # (<= batch, C, D, H, W)
            short = self.batch - chunk.shape[0]
            if short:
                chunk = torch.cat([chunk, chunk.new_zeros(short, *chunk.shape[1:])])  # (batch, C, D, H, W)
            outs.append(self.program(chunk)[: self.batch - short])
        return torch.cat(outs)  # (B, K, D, H, W)


def exported_input_shape(program: torch.export.ExportedProgram) -> list[int | None]:
    """The first user input's shape; ``None`` for a dimension exported as dynamic."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            shape = node.meta["val"].shape
            return [d if isinstance(d, int) else None for d in shape]
    raise CheckpointError("the exported program has no tensor input")


def load_exported(path: Path) -> tuple[nn.Module, tuple[int, int, int] | None]:
    """A ``torch.export`` program as a callable module, and its spatial size when it was exported static.

    Returns:
        (module, roi) with ``roi`` None when every spatial dimension is dynamic (any window size runs).
    """
    try:
        program = torch.export.load(str(path))
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable torch.export program ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "write it with torch.export.save(torch.export.export(model, (example,)), path)"
        ) from err
    shape = exported_input_shape(program)
    if len(shape) != 5:
        raise CheckpointError(f"{path}: the exported program takes a {len(shape)}-d input; expected (B, C, D, H, W)")
    spatial = shape[2:]
    if any(s is None for s in spatial) and not all(s is None for s in spatial):
        raise CheckpointError(f"{path}: export all spatial dimensions dynamic or all static, got {shape}")
    module = program.module()
    if shape[0] is not None:
        module = FixedBatch(module, shape[0])
    return module, (None if spatial[0] is None else tuple(int(s) for s in spatial))
