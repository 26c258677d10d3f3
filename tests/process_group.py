"""The end every script of tests/dist_scripts shares: the default process group destroyed however `main` ends."""

import contextlib

import torch


@contextlib.contextmanager
def process_group_closed():
    """Run the block, then destroy the default process group if one is up: a gloo/NCCL group left for
    interpreter exit can abort the process ("terminate called without an active exception")."""
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
