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
