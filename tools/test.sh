#!/usr/bin/env bash
# The test command (README, .ci/run): installs what is missing, then runs pytest.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow" -x`.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/tools/install.sh" || exit 1
cd "$repo"
# The `slurm` tests run against a real one-node Slurm that tests/test_slurm.py starts (and stops)
# with tools/slurm_cluster.sh. On CI, install it up front so a missing package fails loudly;
# elsewhere the tests install it when run as root, and are skipped when they cannot.
if [[ "${CI:-}" == "true" ]]; then
    bash "$repo/tools/slurm_cluster.sh" install || exit 1
fi
# Two cores on CI: one intra-op thread per test process keeps multi-process tests from
# oversubscribing, and makes CPU results independent of the machine's core count.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE="${WANDB_MODE:-disabled}" DS_ACCELERATOR=cpu
"${BLT_VENV:-$repo/.venv}/bin/python" -m pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then  # pytest: no tests collected. Not a failure of the code, but say so.
    echo "tools/test.sh: pytest collected no tests"
    rc=0
fi
exit $rc
