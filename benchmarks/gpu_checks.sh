#!/usr/bin/env bash
# The GPU checks of docs/speed.md and docs/pretraining.md as one prepared run (a lent GPU's time is short):
# the `gpu`-marked tests, `wsi-il bench` on CUDA, and the pretraining probe, each stage's log and JSON under OUT.
#
#   bash benchmarks/gpu_checks.sh OUT [STAGE ...]      stages: tests bench bench-large graphs-ab reading-ab profile
#                                                      extract-ab rehearse-ab large-slide probe-moco probe-simclr
#                                                      backbones (after bench: timm ViT-L/16 and ViT-S/16)
#                                                      (default: tests bench probe-moco)
# bench-large: the bench on a slide of about 50,000 patches (a large 20x slide; the fixed tiling stage weighs less),
# without the paper's round (large-slide builds that slide alone, which bench-large would otherwise do first);
# graphs-ab: training and the round with and without CUDA graphs (WSI_IL_CUDA_GRAPHS), interleaved;
# extract-ab: the extraction stage alone (tissue mask, statistics sample, features) on the bench's slide with the
# trunk as a CUDA graph and kernel by kernel (WSI_IL_CUDA_GRAPHS), interleaved;
# rehearse-ab: the paper's first round in a fresh process, after `wsi-il watch`'s warm-up (session.rehearse) and
# without it, interleaved (and what importing torch._dynamo costs, which an optimiser's first step does);
# reading-ab: the reader pool alone with JPEG tiles decoded directly and through OpenSlide (WSI_IL_DIRECT_TILES);
# profile: cProfile of a round and of extraction (round.prof, extract.prof: read them with pstats).
# graphs-ab, extract-ab, rehearse-ab, reading-ab and profile need the project that the bench stage leaves in WORK.
# Environment: WSI_IL_DATA  folder holding bach-iciar2018-1536jpeg-sample/ (default ../shared/data)
#              PYTHON       the interpreter that has wsi-il and torch (default python3)
#              DEVICE       cuda (default); cpu runs the same stages as a dry run
#              WORK         scratch folder for slides and projects (default /tmp/wsi-il-gpu-checks)
#              LARGE_PATCHES  patches of bench-large's slide (default 50000)
#              TEST_ARGS    extra options of pytest in the tests stage (split at spaces), e.g.
#                  --deselect=tests/test_gpu.py::test_bench_on_cuda (the bench stage covers it)
#              BENCH_ARGS, ROUND_ARGS, PROBE_ARGS   extra options of the bench, of round_timing.py (graphs-ab,
#                  profile) and of the probe, e.g. smaller sizes for a dry run:
#                  DEVICE=cpu BENCH_ARGS="--patches 150 --labels 40" ROUND_ARGS="--labels 40" PROBE_ARGS="--steps 2"
# Exit status: 0 when every stage passed; stages.txt in OUT lists each stage's exit status and seconds.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT [tests] [bench] [probe-moco] [probe-simclr]}
shift
stages=${*:-tests bench probe-moco}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
data=${WSI_IL_DATA:-../shared/data}
work=${WORK:-/tmp/wsi-il-gpu-checks}
export PYTHONUNBUFFERED=1 WSI_IL_DATA=$data
mkdir -p "$out" "$work"
: > "$out/stages.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not found"
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'; } > "$out/machine.txt" 2>&1

logged() {  # logged NAME COMMAND...: run it, its output to the screen and OUT/NAME.log, and return its status
    local name=$1
    shift
    "$@" 2>&1 | tee "$out/$name.log"
    return "${PIPESTATUS[0]}"
}

stage_spec() {  # stage_spec PROJECT: the bench's extraction stage over the bench's slide into PROJECT, as JSON
    echo "{\"project\": \"$1\", \"slide\": \"$(ls "$work"/bench/bench-*[0-9].tiff | head -1)\", \"weights\": \"random\", \"device\": \"$device\", \"seed\": 0}"
}

failed=0
for stage in $stages; do
    started=$(date +%s)
    case $stage in
        tests)  # without CUDA they are collected and skipped
            logged tests "$py" -m pytest -q -rs -m gpu ${TEST_ARGS:-} tests ;;
        bench)
            logged bench "$py" -m wsi_il bench --device "$device" --data "$data" --out "$work/bench" \
                --json "$out/bench_$device.json" ${BENCH_ARGS:-} ;;
        backbones)  # ViT-L/16 at 224 px (UNI's architecture, random weights: the same compute) and ViT-S/16, each
            # split, on the bench stage's slide: extraction end to end and against the trunk limit, bytes a patch
            logged backbones "$py" -m wsi_il bench --device "$device" \
                --slide "$(ls "$work"/bench/bench-*[0-9].tiff | head -1)" --backbones-only \
                --backbone 'vit_large_patch16_224:{"init_values": 1e-5}' --backbone vit_small_patch16_224 \
                --out "$work/backbones" --json "$out/backbones_$device.json" ;;
        large-slide)  # only build bench-large's slide (e.g. in the background while other stages run)
            logged large_slide "$py" -c "import sys; from pathlib import Path; from wsi_il.measure.bench import build_bench_slide
print(build_bench_slide(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), 0))" \
                "$work/bench-large" "${LARGE_PATCHES:-50000}" "$data" ;;
        bench-large)
            logged bench_large "$py" -m wsi_il bench --device "$device" --data "$data" --out "$work/bench-large" \
                --patches "${LARGE_PATCHES:-50000}" --no-paper --json "$out/bench_large_$device.json" ;;
        graphs-ab)
            logged graphs_ab bash -c "for graphs in --graphs --no-graphs; do
                    $py benchmarks/heads_timing.py --device $device --schedule paper \$graphs || exit; done
                for graphs in 1 0 1 0; do
                    WSI_IL_CUDA_GRAPHS=\$graphs $py benchmarks/round_timing.py $work/bench --runs 1 \
                        --device $device --variant paper ${ROUND_ARGS:-} | tail -1 | sed \"s/^/graphs=\$graphs /\" || exit; done" ;;
        extract-ab)
            spec=$(stage_spec "$work/ab-project")
            logged extract_ab bash -c "for graphs in 1 0 1 0; do rm -rf $work/ab-project
                    WSI_IL_CUDA_GRAPHS=\$graphs $py -m wsi_il.measure.bench '$spec' | tail -1 | sed \"s/^/graphs=\$graphs /\" || exit
                done" ;;
        rehearse-ab)
            logged rehearse_ab bash -c "$py -c 'import time, torch; started = time.perf_counter(); import torch._dynamo
print(\"import torch._dynamo:\", round(time.perf_counter() - started, 3), \"s\")' || exit
                for rehearse in --rehearse '' --rehearse ''; do
                    $py benchmarks/round_timing.py $work/bench --runs 1 --device $device --variant paper \$rehearse \
                        ${ROUND_ARGS:-} | sed -n 1p || exit; done" ;;
        reading-ab)
            logged reading_ab "$py" benchmarks/reading_ab.py "$work/bench" --device "$device" ;;
        profile)
            spec=$(stage_spec "$work/profile-project")
            rm -rf "$work/profile-project"
            logged profile bash -c "$py -m cProfile -o $out/round.prof benchmarks/round_timing.py $work/bench \
                    --runs 2 --device $device --variant paper ${ROUND_ARGS:-} &&
                $py -m cProfile -o $out/extract.prof -m wsi_il.measure.bench '$spec'" ;;
        probe-moco | probe-simclr)
            method=${stage#probe-}
            logged "probe_$method" "$py" benchmarks/pretrain_probe.py --device "$device" --method "$method" \
                --data "$data" --out "$work/probe-$method" ${PROBE_ARGS:-} &&
                cp "$work/probe-$method/pretrain_probe.json" "$out/pretrain_probe_${device}_$method.json" ;;
        *)
            echo "unknown stage '$stage': use tests, bench, large-slide, bench-large, graphs-ab, extract-ab, rehearse-ab, reading-ab, profile, probe-moco or" \
                "probe-simclr" >&2
            exit 2 ;;
    esac
    status=$?
    echo "$stage: exit $status, $(( $(date +%s) - started )) s" | tee -a "$out/stages.txt"
    [ "$status" -eq 0 ] || failed=1
done
exit "$failed"
