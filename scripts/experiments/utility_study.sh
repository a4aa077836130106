#!/usr/bin/env bash
# The quality and utility tables of the README and docs/measurements.md, through the
# product itself: a fresh embedded deployment (SQLite, serverless broker, one worker),
# the reference data ingested by the CLI, a generator trained for TRAIN_SECONDS (its
# quality metrics and gallery come with the model version), then `synthray evaluate`.
#
#   scripts/experiments/utility_study.sh kermany-imb   # viral class cut to 10% of its patients
#   scripts/experiments/utility_study.sh kermany       # the three classes as they are
#   scripts/experiments/utility_study.sh nih           # the seed study's five NIH classes
#
# Settings (environment): DATA (default ../shared/data), ARCH (latentflow), TRAIN_SECONDS
# (300), RESOLUTION (64), GEN_SEED (0, the generator's training seed), SEEDS (3 classifier
# seeds; 0 skips the evaluation), STEPS (300), ARMS (every arm; a comma list such as DS1,TSTR),
# BATCH (the generator's batch size; the architecture's default if unset), TRAIN_STEPS (a
# step budget for the generator instead of TRAIN_SECONDS; both if both are set), PRECISION
# (auto, fp32 or bf16: the generator's training), MODEL (the registry name; the set's name;
# a new one with STATE, as the gallery fetched is version 1's),
# STATE (an earlier study's state folder: train and evaluate another model in that
# deployment, without ingesting again; the quality encoders are trained once per dataset
# version, so both models are then measured in the same feature spaces). Output:
# var/study-<set>-<resolution>-<time>/ with train.json (the version's metrics), gallery.png,
# the evaluation's CSV and chart, the worker and API logs, and summary.txt (the printed
# table).
set -euo pipefail
cd "$(dirname "$0")/../.."
SET=${1:?usage: utility_study.sh kermany-imb|kermany|nih}
DATA=$(cd "${DATA:-../shared/data}" && pwd)
TRAIN_STEPS=${TRAIN_STEPS:-}
if [ -n "$TRAIN_STEPS" ]; then TRAIN_SECONDS=${TRAIN_SECONDS:-}; else TRAIN_SECONDS=${TRAIN_SECONDS:-300}; fi
RESOLUTION=${RESOLUTION:-64}
SEEDS=${SEEDS:-3}
ARCH=${ARCH:-latentflow}
GEN_SEED=${GEN_SEED:-0}
BATCH=${BATCH:-}
STEPS=${STEPS:-300}
ARMS=${ARMS:-}
PRECISION=${PRECISION:-auto}
MODEL=${MODEL:-$SET}
STATE=${STATE:+$(cd "$STATE" && pwd)}
OUT=var/study-$SET-$RESOLUTION-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SR=.venv/bin/synthray
export SYNTHRAY_DEV_MODE=true SYNTHRAY_DATA_DIR="${STATE:-$OUT/state}" SYNTHRAY_IMPORT_ROOT="$DATA"
unset SYNTHRAY_DATABASE_URL SYNTHRAY_BROKER_URL
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export SYNTHRAY_URL=http://127.0.0.1:$PORT
SYNTHRAY_API_KEY=$($SR keys create --role admin --name study 2>/dev/null | tail -n 1)
export SYNTHRAY_API_KEY
# Its own process group, so that the API and its worker are stopped together.
setsid $SR serve --port "$PORT" > "$OUT/api.log" 2>&1 &
SERVER=$!
trap 'kill -- -$SERVER 2>/dev/null; sleep 5; kill -9 -- -$SERVER 2>/dev/null; true' EXIT
for _ in $(seq 1 60); do curl -fs "$SYNTHRAY_URL/healthz" > /dev/null && break; sleep 1; done
T0=$(date +%s)
log() { printf '[study %s +%ss] %s\n' "$SET" "$(( $(date +%s) - T0 ))" "$*" | tee -a "$OUT/summary.txt"; }

RES_LIST=64
[ "$RESOLUTION" != 64 ] && RES_LIST="64,$RESOLUTION"
IMBALANCE=()
case "$SET" in
    kermany|kermany-imb)
        DATASET=kermany
        [ "$SET" = kermany-imb ] && IMBALANCE=(--imbalance virus=0.1)
        if [ -z "$STATE" ]; then
            log "ingest Kermany (normal, bacteria, virus) at $RES_LIST px"
            $SR ingest kermany --source kermany-224 --classes normal,bacteria,virus \
                --label-column subtype --patient-column patient_key --resolutions "$RES_LIST" \
                > "$OUT/ingest.json"
        fi
        ;;
    nih)
        DATASET=nih
        if [ -z "$STATE" ]; then
            log "ingest NIH ChestX-ray14 (the seed study's five classes) at 64 px"
            $SR ingest nih --source nih-cxr14-64 \
                --classes Normal,Cardiomegaly,Effusion,Edema,Pneumothorax \
                --label-column "Finding Labels" --label-separator "|" \
                --label-map '{"No Finding": "Normal"}' --patient-column "Patient ID" \
                > "$OUT/ingest.json"
        fi
        ;;
    *) echo "unknown set $SET" >&2; exit 2 ;;
esac
[ -n "$STATE" ] && log "in the deployment of $STATE (no ingest)"
log "train $MODEL: $ARCH for ${TRAIN_SECONDS:+${TRAIN_SECONDS}s }${TRAIN_STEPS:+$TRAIN_STEPS steps }at ${RESOLUTION}px, seed $GEN_SEED, precision $PRECISION ${BATCH:+batch $BATCH }${IMBALANCE[*]:-}"
$SR train "$DATASET" --model-name "$MODEL" --architecture "$ARCH" --precision "$PRECISION" \
    ${TRAIN_SECONDS:+--max-seconds "$TRAIN_SECONDS"} ${TRAIN_STEPS:+--max-steps "$TRAIN_STEPS"} \
    --resolution "$RESOLUTION" --seed "$GEN_SEED" "${IMBALANCE[@]}" \
    ${BATCH:+--batch-size "$BATCH"} \
    > "$OUT/train.json"
curl -fs -H "X-API-Key: $SYNTHRAY_API_KEY" \
    "$SYNTHRAY_URL/v1/models/$MODEL/versions/1/gallery.png" -o "$OUT/gallery.png" \
    && log "gallery: $OUT/gallery.png"
if [ "$SEEDS" -gt 0 ]; then
    log "evaluate: $SEEDS seeds, $STEPS classifier steps per arm"
    $SR evaluate "$MODEL" --seeds "$SEEDS" --steps "$STEPS" ${ARMS:+--arms "$ARMS"} --dest "$OUT" \
        | tee -a "$OUT/summary.txt"
fi
log "done; $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"
