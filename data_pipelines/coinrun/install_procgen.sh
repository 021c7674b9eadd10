#!/usr/bin/env bash
# Installs procgen (CoinRun) into the current Python environment.
#
# The only Python 3.11 wheel of procgen on PyPI, `procgen-mirror`, pins numpy<2 in its metadata
# while genie_jax needs numpy>=2. Its compiled code works with numpy 2, so the wheel and its
# runtime dependencies are installed without dependency resolution, which would otherwise
# downgrade numpy. gym 0.26 is what procgen's gym3 wrapper imports.
#
# Usage: bash data_pipelines/coinrun/install_procgen.sh   (uses `python` from PATH, or $PYTHON)
set -euo pipefail

PYTHON="${PYTHON:-python}"
"${PYTHON}" -m pip install --no-deps procgen-mirror gym3 gym==0.26.2 gym-notices cffi glfw \
  moderngl filelock pycparser
# Fail here, not hours later in data generation, when the install does not work.
"${PYTHON}" - <<'PY'
import numpy as np
from procgen import ProcgenGym3Env
env = ProcgenGym3Env(num=1, env_name="coinrun", distribution_mode="hard", start_level=0,
                     num_levels=1, rand_seed=0)
_, obs, _ = env.observe()
assert obs["rgb"].shape == (1, 64, 64, 3), obs["rgb"].shape
print(f"procgen OK (numpy {np.__version__})")
PY
