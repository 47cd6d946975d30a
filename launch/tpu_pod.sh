#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice: the same command on every worker, over ssh.
#
#   launch/tpu_pod.sh --tpu=my-v4-32 --zone=us-central2-b --setup -- \
#       --config=configs/cifar10_switch.py --workdir=/mnt/shared/cifar10_switch \
#       --config.input.data_dir=/mnt/shared/tensorflow_datasets --config.model.dtype=bfloat16
#
# --setup first copies this checkout to every worker (~/vmoe_jax) and installs
# it there with jax[tpu]. Then, through
#
#   gcloud compute tpus tpu-vm ssh TPU --zone=ZONE --worker=all --command=...
#
# every worker runs `python3 -m vmoe_jax.main --distributed=on ARGS...`; JAX's
# TPU detection reads the coordinator (worker 0), the process count and ids
# from the TPU metadata. --workdir must be on a filesystem that every worker
# mounts (e.g. Filestore over NFS): each worker writes its checkpoint shards.
# --dry_run prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE [options] -- ARGS of vmoe_jax.main
  --project=PROJECT    gcloud project (gcloud's default)
  --remote_dir=DIR     checkout on the workers, relative to home (vmoe_jax)
  --python=PYTHON      interpreter on the workers (python3)
  --setup              copy this checkout to the workers and pip install it first
  --dry_run            print the gcloud commands instead of running them
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

tpu=""
zone=""
project=""
remote_dir=vmoe_jax
python=python3
setup=0
dry_run=0

while (($#)); do
  case "$1" in
    --tpu=*) tpu=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --remote_dir=*) remote_dir=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --setup) setup=1 ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      break
      ;;
    *) die "unknown option '$1' before --; see launch/tpu_pod.sh --help." ;;
  esac
  shift
done
main_args=("$@")

[[ -n $tpu ]] || die "--tpu is missing; give the TPU VM name, e.g. --tpu=my-v4-32."
[[ -n $zone ]] || die "--zone is missing; give the TPU's zone, e.g. --zone=us-central2-b."
((${#main_args[@]})) || die "give the arguments of vmoe_jax.main after --, e.g. -- --config=configs/cifar10_switch.py --workdir=DIR."

gcloud_flags=("--zone=$zone")
[[ -n $project ]] && gcloud_flags+=("--project=$project")

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
    "$@"
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" --worker=all --command="$1"
}

if ((setup)); then
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  archive=${TMPDIR:-/tmp}/vmoe_jax-$$.tar.gz
  # The working tree as git sees it: tracked and new files, nothing that .gitignore lists.
  if ((dry_run)); then
    echo "git -C $(quoted "$repo") ls-files -z -co --exclude-standard | tar -czf $(quoted "$archive") -C $(quoted "$repo") --null -T -"
  else
    git -C "$repo" ls-files -z -co --exclude-standard | tar -czf "$archive" -C "$repo" --null -T -
  fi
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:vmoe_jax.tar.gz" "${gcloud_flags[@]}" --worker=all
  on_all_workers "mkdir -p $(quoted "$remote_dir") && tar -xzf vmoe_jax.tar.gz -C $(quoted "$remote_dir") && $(quoted "$python") -m pip install -q -e $(quoted "$remote_dir") 'jax[tpu]>=0.7.1,<0.12'"
  ((dry_run)) || rm -f "$archive"
fi

on_all_workers "cd $(quoted "$remote_dir") && $(quoted "$python" -m vmoe_jax.main --distributed=on "${main_args[@]}")"
