#!/usr/bin/env bash
# Multi-node training on a SLURM GPU cluster, through JAX's multi-controller runtime.
#
#   launch/slurm.sh --nodes=2 --gpus_per_node=8 -- \
#       --config=configs/cifar10_switch.py --workdir=/shared/runs/cifar10_switch \
#       --config.input.data_dir=/shared/tensorflow_datasets --config.model.dtype=bfloat16
#
# Outside a SLURM job it submits itself with sbatch (the job gets this shell's
# environment: activate the virtualenv first); inside a job (sbatch running it,
# or an salloc shell) it starts the processes with srun. Every process runs
#
#   python -m vmoe_jax.main --distributed=on ARGS...
#
# and JAX's SLURM detection gives it the coordinator (the job's first node),
# the process count and its id. Two layouts:
#   --per=gpu   one process per GPU (default): G tasks per node, each sees the
#               node's GPUs and JAX keeps GPU number SLURM_LOCALID;
#   --per=node  one process per node driving its G GPUs
#               (JAX_LOCAL_DEVICE_IDS=0,...,G-1).
# --workdir must be on a filesystem that every node mounts.
# --dry_run prints the sbatch (outside a job) or srun (inside) command instead.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/slurm.sh [options] -- ARGS of vmoe_jax.main (--config=... --workdir=...)
  --nodes=N            nodes (2)
  --gpus_per_node=G    GPUs per node (8)
  --per=gpu|node       one process per GPU (default) or per node
  --partition=P        --account=A   --time=HH:MM:SS (24:00:00)
  --job_name=NAME      (vmoe)        --log_dir=DIR (.): DIR/NAME-JOBID.out
  --sbatch_arg=ARG     extra sbatch option, repeatable (e.g. --sbatch_arg=--exclusive)
  --python=PYTHON      interpreter on the nodes (python)
  --dry_run            print the command instead of running it
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

nodes=2
gpus_per_node=8
per=gpu
partition=""
account=""
time_limit=24:00:00
job_name=vmoe
log_dir=.
python=python
dry_run=0
sbatch_args=()
own_args=()

while (($#)); do
  case "$1" in
    --nodes=*) nodes=${1#*=} ;;
    --gpus_per_node=*) gpus_per_node=${1#*=} ;;
    --per=*) per=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --account=*) account=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --job_name=*) job_name=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --sbatch_arg=*) sbatch_args+=("${1#*=}") ;;
    --python=*) python=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      break
      ;;
    *) die "unknown option '$1' before --; see launch/slurm.sh --help." ;;
  esac
  [[ $1 == --dry_run ]] || own_args+=("$1")
  shift
done
main_args=("$@")

[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes=$nodes; give a whole number >= 1."
[[ $gpus_per_node =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node=$gpus_per_node; give a whole number >= 1."
[[ $per == gpu || $per == node ]] || die "--per=$per is unknown; use --per=gpu or --per=node."
((${#main_args[@]})) || die "give the arguments of vmoe_jax.main after --, e.g. -- --config=configs/cifar10_switch.py --workdir=DIR."

if [[ $per == gpu ]]; then
  tasks_per_node=$gpus_per_node
else
  tasks_per_node=1
fi

# Words as a shell reads them back: quoted only where needed.
quoted() {
  local word out=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
      out+=("$word")
    else
      out+=("${word@Q}")
    fi
  done
  echo "${out[*]}"
}

run() {
  if ((dry_run)); then
    quoted "$@"
  else
    exec "$@"
  fi
}

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  # Outside a job: submit this script, which runs the branch below on the first node.
  script=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
  cmd=(sbatch
    "--job-name=$job_name"
    "--nodes=$nodes"
    "--ntasks-per-node=$tasks_per_node"
    "--gpus-per-node=$gpus_per_node"
    "--time=$time_limit"
    "--output=$log_dir/%x-%j.out"
    "--chdir=$PWD")
  [[ -n $partition ]] && cmd+=("--partition=$partition")
  [[ -n $account ]] && cmd+=("--account=$account")
  cmd+=("${sbatch_args[@]}" "$script" "${own_args[@]}" -- "${main_args[@]}")
  run "${cmd[@]}"
  exit 0
fi

# Inside a job: one task per process, on every node of the job.
job_nodes=${SLURM_JOB_NUM_NODES:-$nodes}
if [[ $per == node ]]; then
  local_ids=$(seq -s, 0 $((gpus_per_node - 1)))
  export JAX_LOCAL_DEVICE_IDS=$local_ids
  ((dry_run)) && echo "export JAX_LOCAL_DEVICE_IDS=$local_ids"
fi
run srun \
  "--nodes=$job_nodes" \
  "--ntasks-per-node=$tasks_per_node" \
  --kill-on-bad-exit=1 \
  --label \
  "$python" -m vmoe_jax.main --distributed=on "${main_args[@]}"
