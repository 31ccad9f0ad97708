"""Multi-controller JAX start-up: one process per host, each owning its local devices.

`initialize()` is called by the launchers before anything touches devices:
  * with an explicit coordinator (flags), e.g. two processes on one machine:
      --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=0|1
  * without flags, on a cluster JAX detects itself (SLURM with several tasks, Cloud TPU pods),
    through jax.distributed.initialize()'s own detection;
  * otherwise single-process (nothing to do).
On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax
from absl import logging

_CLUSTER_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "OMPI_COMM_WORLD_SIZE")


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return any(k in os.environ for k in _CLUSTER_ENV[1:])


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Starts jax.distributed when asked to (flags) or when a cluster is detected."""
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given) and not all(v is not None for v in given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together; got "
                     f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
  if all(v is not None for v in given):
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _cluster_detected():
    _cpu_collectives()
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def define_process_flags() -> Callable[[], None]:
  """Defines --coordinator_address/--num_processes/--process_id (absl) for a launcher.

  Returns a function to call at the top of `main`: it starts jax.distributed from the flags
  (`initialize`) and leaves logging to process 0 (the others log warnings only).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  coordinator = flags.DEFINE_string("coordinator_address", None,
                                    "host:port of process 0 (multi-process runs).")
  num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes.")
  process_id = flags.DEFINE_integer("process_id", None, "This process's index.")

  def start() -> None:
    initialize(coordinator.value, num_processes.value, process_id.value)
    if jax.process_index() != 0:
      logging.set_verbosity(logging.WARNING)  # one process logs

  return start


def _cpu_collectives() -> None:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms in ("", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
