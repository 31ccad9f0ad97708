"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os
import sys

# 8 device threads share the CI machine's 2 cores: under load one can reach a collective long
# after the others, and XLA:CPU aborts the whole process when a collective waits longer than its
# termination timeout (40 s by default). A fresh-clone CI run beside two training jobs aborted
# once inside a sharded evaluation (no Python error; pytest's capture swallowed XLA's message),
# which is what this timeout produces.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=900").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One persistent XLA compilation cache for the whole test session, shared by every process it
# starts (the launcher subprocesses of the resume, sweep and multi-process tests inherit the
# variable): many tests compile the same small programs again, in-process and in subprocesses,
# and a hit skips XLA's compile. The cache key covers the program, the compile options and the
# devices, so a hit is the executable a fresh compile would build. Setting a maximum size turns
# on JAX's file lock, which the processes compiling the same program at once need. A cache the
# caller set (JAX_COMPILATION_CACHE_DIR) is used as it is and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  _cache = tempfile.mkdtemp(prefix="seqrec_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  try:
    import filelock  # pylint: disable=g-import-not-at-top,unused-import
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
  except ImportError:  # JAX's cache then reads a half-written entry as a miss, with a warning
    pass
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
