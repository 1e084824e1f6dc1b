#!/usr/bin/env bash
# Cloud TPU VM launcher: create a TPU VM (or a queued resource), install s2d_jax on every worker, run one `s2d`
# command on every worker at once, delete. JAX's runtime joins the workers (`--distributed`: on Cloud TPU it finds
# the other workers itself), so a v5e-8 (one host) and a v5p-64 (8 hosts) run the same command.
#
#   launch/tpu_vm.sh create              # or: QUEUED=1 launch/tpu_vm.sh create (queued resource, waits for it)
#   launch/tpu_vm.sh install             # clone REPO at REF, pip install '.[tpu]', mount the bucket, on all workers
#   launch/tpu_vm.sh run STAGE --config configs/rar2_last_letters.py --config.model.path=/gcs/models/llama-3-8b
#   launch/tpu_vm.sh ssh                 # a shell on worker 0
#   launch/tpu_vm.sh delete
#
# Artifacts: every worker mounts gs://$BUCKET at /gcs (gcsfuse), so the workdir /gcs/runs/$RUN is one shared
# directory: each host writes its rollout shard rollouts-P-of-N.jsonl there, and filter/train/eval read them.
# Checkpoints go straight to gs://$BUCKET/runs/$RUN/checkpoints through Orbax (train.checkpoint_dir), each host
# writing its own shards. Model weights are read from the mount (copy them to gs://$BUCKET/models first).
set -euo pipefail

NAME=${NAME:-s2d}
ZONE=${ZONE:-us-west4-a}
TYPE=${TYPE:-v5litepod-8}                   # v5litepod-8 = v5e-8 (1 host); v5p-64 = 8 hosts x 4 chips
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}     # v5p: v2-alpha-tpuv5
BUCKET=${BUCKET:?set BUCKET to a gs:// bucket name (without gs://) for models, artifacts and checkpoints}
RUN=${RUN:-$NAME}
REPO=${REPO:-https://github.com/s2d-jax/s2d_jax.git}
REF=${REF:-main}
SPOT=${SPOT:-}                              # SPOT=1: preemptible capacity (resume by rerunning `run`)

tpu() { gcloud compute tpus "$@" --zone "$ZONE"; }
on_all() { tpu tpu-vm ssh "$NAME" --worker=all --command "$1"; }

case "${1:-}" in
  create)
    if [[ -n "${QUEUED:-}" ]]; then
      tpu queued-resources create "$NAME" --node-id "$NAME" --accelerator-type "$TYPE" \
        --runtime-version "$RUNTIME" ${SPOT:+--spot}
      until tpu queued-resources describe "$NAME" --format='value(state.state)' | grep -q ACTIVE; do
        echo "waiting for $NAME ..."; sleep 30
      done
    else
      tpu tpu-vm create "$NAME" --accelerator-type "$TYPE" --version "$RUNTIME" ${SPOT:+--spot}
    fi ;;
  install)
    on_all "set -e
      sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv gcsfuse >/dev/null
      test -d s2d_jax || git clone -q $REPO s2d_jax
      cd s2d_jax && git fetch -q && git checkout -q $REF
      test -x .venv/bin/python || python3 -m venv .venv
      .venv/bin/pip install -q -e '.[tpu]'
      sudo mkdir -p /gcs && sudo chown \$USER /gcs
      mountpoint -q /gcs || gcsfuse --implicit-dirs $BUCKET /gcs" ;;
  run)
    shift
    stage=${1:?usage: launch/tpu_vm.sh run STAGE --config CONFIG [--config.KEY=VALUE ...]}; shift
    # every worker runs the same command; --distributed lets JAX find the others (one process per host)
    on_all "cd s2d_jax && .venv/bin/s2d $stage --workdir /gcs/runs/$RUN \
      --config.train.checkpoint_dir=gs://$BUCKET/runs/$RUN/checkpoints --distributed $* 2>&1 | tee -a /tmp/s2d.log" ;;
  ssh)
    tpu tpu-vm ssh "$NAME" --worker=0 ;;
  delete)
    if [[ -n "${QUEUED:-}" ]]; then tpu queued-resources delete "$NAME" --force --quiet
    else tpu tpu-vm delete "$NAME" --quiet; fi ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
