"""Orbax checkpoints: periodic (async) for resumption, plus the best-on-valid parameters.

Layout under the workdir:
  checkpoints/<step>/{state, meta}   train state + loop metadata (iterator position, early-stopping
                                     bookkeeping, elapsed seconds); the newest `max_to_keep` kept.
  best/<step>/{params, meta}         parameters at the best validation score so far (one kept).

Orbax writes each step into a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous complete step loadable.  State is restored into an abstract target
that carries the *current* run's shardings, so a checkpoint resumes on a different mesh shape or
process count.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of a (sharded, concrete or abstract) pytree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


LATEST_DIR = "checkpoints"  # <workdir>/checkpoints/<step>: the periodic train-state checkpoints


def latest_step_on_disk(workdir: str) -> Optional[int]:
  """The newest complete step under <workdir>/checkpoints without opening a manager (Orbax
  renames a step's directory to its number only once it is written), or None."""
  folder = os.path.join(os.path.abspath(workdir), LATEST_DIR)
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return max(steps) if steps else None


class Checkpointer:
  """Saves and restores train state, loop metadata and the best parameters."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2, async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"config.checkpoint.max_to_keep must be >= 1, got {max_to_keep}")
    self.workdir = os.path.abspath(workdir)
    self._latest = ocp.CheckpointManager(
        os.path.join(self.workdir, LATEST_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))
    self._best = ocp.CheckpointManager(
        os.path.join(self.workdir, "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    return self._latest.latest_step()

  def best_step(self) -> Optional[int]:
    return self._best.latest_step()

  def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
    """Saves the train state and JSON metadata at `step` (asynchronously when enabled).

    A best-parameters save still in flight is committed first: the loop metadata names the best
    step, so a process killed between the two commits must not leave a resumable checkpoint that
    points at best parameters which were never written.
    """
    if step in self._latest.all_steps():
      logging.info("checkpoint for step %d already exists; keeping it", step)
      return
    self._best.wait_until_finished()
    self._latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, target: Any) -> Tuple[Any, Dict[str, Any]]:
    """Restores (state, meta) at `step` onto the shardings of `target`.

    Args:
      step: a step listed by `latest_step()` / the checkpoints directory.
      target: a pytree shaped like the state whose leaves carry the wanted shardings (concrete
        arrays or ShapeDtypeStructs); the checkpoint's own mesh does not matter.
    """
    restored = self._latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def save_best(self, step: int, params: Any, meta: Dict[str, Any]) -> None:
    """Keeps `params` as the best so far (the previous best is replaced once this one is saved).

    A run that died after its best save but before its next periodic checkpoint replays the same
    steps deterministically on resume and reaches this step again with identical parameters: the
    existing copy is kept.
    """
    if step in self._best.all_steps():
      logging.info("best checkpoint for step %d already exists; keeping it", step)
      return
    self._best.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)), force=True)

  def restore_best(self, target_params: Any) -> Tuple[Any, Dict[str, Any]]:
    """Restores the best parameters onto the shardings of `target_params`."""
    step = self._best.latest_step()
    if step is None:
      raise FileNotFoundError(f"no best checkpoint under {os.path.join(self.workdir, 'best')}")
    restored = self._best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(target_params)), meta=ocp.args.JsonRestore()))
    return restored["params"], dict(restored["meta"])

  def best_params_metadata(self, step: int) -> Any:
    """The saved tree of the best parameters at `step`: leaves carry `.shape` and `.dtype`.

    Read from the checkpoint's metadata alone (no array is loaded), e.g. to build a restore
    target for a subtree (serving restores only what the encoder needs, onto its own mesh).
    """
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(self._best.directory) / str(step) / "params"
    metadata = ocp.StandardCheckpointHandler().metadata(path)
    return getattr(metadata, "tree", metadata)

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._latest.close()
    self._best.close()
    logging.info("checkpoints closed under %s", self.workdir)
