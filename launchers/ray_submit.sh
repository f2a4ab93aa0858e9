#!/usr/bin/env bash
# Submit `unlearn run CONFIG [key=value ...]` to a Ray cluster as a Ray job, on the Ray backend:
#   launchers/ray_submit.sh http://HEAD:8265 configs/tofu.yaml backend.num_workers=8 backend.use_gpu=true
# A thin wrapper over `ray job submit`: it uploads this checkout as the job's working dir (without the
# venv, git objects and run outputs) and waits for the job, streaming its logs (progress and metrics);
# the job's last lines say where the model, the report and Ray Train's checkpoints went. Paths in the
# overrides (data, model, output_dir) are read on the cluster: use absolute paths on shared storage.
# `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s): the job
# is given UNLEARN_STOP_WAIT_S (default 300) for the workers to write a checkpoint at their next step.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launchers/ray_submit.sh ADDRESS CONFIG [key=value ...]   (ADDRESS: http://HEAD:8265)" >&2
  exit 2
fi
ADDRESS=$1
CONFIG=$2
shift 2
cd "$(dirname "$0")/.."
exec "${RAY:-ray}" job submit --address "$ADDRESS" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".git", "runs", "*.partial", "*.ray", "*.tokens", "__pycache__"],
    "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "'"${UNLEARN_STOP_WAIT_S:-300}"'"}}' \
  -- "${PYTHON:-python}" -m engine.cli run "$CONFIG" backend.name=ray "$@"
