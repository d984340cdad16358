"""HDF5 checkpoints: everything a run needs to resume exactly, on any rank count.

Three concerns, one module each, so that each reads (and changes) on its own:

    format.py   the file: HDF5 layout, dtype encoding, CRC-32s; reading, checking and
                describing one file (`fedhpc inspect`)
    resume.py   which checkpoint a run resumes from, and which config keys may change
    writer.py   `Checkpointer`: gather to rank 0, background thread, atomic write, keep-N

Callers import from here, not from the modules.
"""
from .format import (FORMAT, FORMAT_VERSION, CheckpointError, Restored, Snapshot, checkpoint_dir, describe, load,
                     read_config, restore_rows, saved_round, verify)
from .format import _to_numpy  # noqa: F401  (bench/checkpoint.py builds Snapshots with it)
from .resume import MAY_CHANGE_ON_RESUME, find_resumable, resume_config
from .writer import CheckpointConfig, Checkpointer, write_checkpoint

__all__ = ["CheckpointConfig", "Checkpointer", "Restored", "Snapshot", "write_checkpoint", "verify", "describe",
           "find_resumable", "read_config", "resume_config", "saved_round", "load", "checkpoint_dir",
           "CheckpointError", "FORMAT", "FORMAT_VERSION", "MAY_CHANGE_ON_RESUME", "restore_rows"]
