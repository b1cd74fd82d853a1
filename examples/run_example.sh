#!/usr/bin/env bash
# Run one whole annotation session on the bundled CC0 slide, with a simulated expert, offline.
#   bash examples/run_example.sh [PROJECT_DIR] [WEIGHTS]
# WEIGHTS: random (default: works offline, but the features are NOT pretrained), imagenet (needs the
# torchvision ResNet-18 file in torch's cache or internet), or a state-dict file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
project="${1:-example-project}"
weights="${2:-random}"
rounds=3
rm -rf "$project"
wsi-il init "$project" --slide "$here/CMU-1-Small-Region.svs" --classes Tumor,Normal --tile-size 128 \
  --weights "$weights" --epochs 15 --device cpu
wsi-il query "$project" --region "$here/query.geojson" --label Tumor --strategy cnfp -k 8 --rounds "$rounds" \
  --device cpu
for round in $(seq 1 "$rounds"); do
  batch="$project/batches/s1-r$round"
  python "$here/pseudo_expert.py" "$batch" "$here/truth.geojson"   # the expert fills labels.csv
  wsi-il ingest "$project" "$batch/labels.csv" --device cpu
done
wsi-il export "$project" --out "$project/export/tumor.geojson"
wsi-il status "$project"
echo "Look at: $project/batches/s1-r1/contact_sheet.png and $project/export/tumor.png"
