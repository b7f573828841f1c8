"""Flat buffers: a model's state as one contiguous tensor, for broadcasts, gathers and
checksums (one message instead of one per tensor)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def flatten_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """All entries (integer counters too, exact below 2^24) as one float32 CPU vector.

    Each entry is copied once, straight into its slice: ``reshape(-1)`` + ``cat`` would copy
    every channels-last weight twice and hold both copies at once (phase 2's peak memory)."""
    flat = torch.empty(sum(t.numel() for t in state.values()), dtype=torch.float32)
    offset = 0
    for t in state.values():
        flat[offset:offset + t.numel()].view(t.shape).copy_(t.detach())  # logical (NCHW) order
        offset += t.numel()
    return flat


def unflatten_state(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key, t in like.items():
        out[key] = flat[offset:offset + t.numel()].view(t.shape).to(t.device, t.dtype)
        offset += t.numel()
    return out


def unflatten_into(model: nn.Module, flat: torch.Tensor) -> None:
    state = model.state_dict()  # once: building it per entry made this quadratic in the depth
    with torch.no_grad():
        for key, value in unflatten_state(flat, state).items():
            state[key].copy_(value)


def checksum(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer, bit for bit."""
    return checksum_state(model.state_dict())


def checksum_state(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, t in state.items():
        digest.update(key.encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
