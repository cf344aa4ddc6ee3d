#!/usr/bin/env bash
# Train the embedded default's glue (projections, signal-token rows, LoRA) through the three stages
# and ship it into mmllm/toyworld/weights/default-glue. Resumable: re-run it after an interruption and
# every finished stage is skipped, the interrupted one continues from its last checkpoint.
#
#   scripts/train_default.sh                  # everything (about 1.5 h on one core; see docs/embedded-default.md)
#   STEPS_SCALE=0.1 scripts/train_default.sh  # a quick smoke run (10% of the steps), not shipped
#   ACCELERATE="accelerate launch --config_file configs/accelerate/ddp.yaml" scripts/train_default.sh
#   OVERRIDES="assembly.decoders.image.model=/elsewhere/decoder-image" scripts/train_default.sh
#
# OVERRIDES (key=value, space-separated) go to every stage. The glue does not depend on the
# decoders' denoisers (the stages' denoise loss is 0; the targets come from the decoders' text
# encoder), so it can be trained against stand-in decoders; the shipped copy always records
# configs/assemblies/default.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

RUNS=${RUNS:-runs/default}
DATA=$RUNS/data
SHIP=${SHIP:-mmllm/toyworld/weights/default-glue}
PLAIN=data/default/plain_chat.jsonl
SCALE=${STEPS_SCALE:-1}
MMLLM=${ACCELERATE:+$ACCELERATE -m mmllm.cli}
MMLLM=${MMLLM:-mmllm}

if [ ! -f "$PLAIN" ]; then
  echo "== distilling the base core's plain-chat answers into $PLAIN"
  mmllm world distil --out "$PLAIN"
fi
echo "== stage data -> $DATA"
mmllm world data --out "$DATA" --plain "$PLAIN"

previous=""
for stage in encode_align decode_align instruct; do
  config=configs/stages/default/$stage.yaml
  steps=$(python -c "import yaml,sys; print(max(1, round(yaml.safe_load(open('$config'))['max_steps'] * $SCALE)))")
  args=(--config "$config" --resume "output_dir=$RUNS/$stage" "max_steps=$steps" "report_to=none")
  # shellcheck disable=SC2206
  args+=(${OVERRIDES:-})
  if [ -n "$previous" ]; then args+=("init_from=$previous"); fi
  echo "== $stage: $steps steps"
  $MMLLM train "${args[@]}"
  previous=$RUNS/$stage/step-$steps
done

echo "== refining the output projections on cached signal states"
refined=$RUNS/refined
if [ ! -f "$refined/manifest.json" ]; then
  mmllm refine --checkpoint "$previous" --data "$DATA/t2x.jsonl" "$DATA/multi.jsonl" \
    --steps "$(python -c "print(max(1, round(3000 * $SCALE)))")" --output "$refined"
fi
previous=$refined

if [ "$SCALE" = "1" ]; then
  echo "== shipping $previous -> $SHIP (fp16, no training state)"
  mmllm export --checkpoint "$previous" --output "$SHIP" --dtype float16 --assembly configs/assemblies/default.yaml
else
  echo "== STEPS_SCALE=$SCALE: not shipped; evaluate with: mmllm eval --checkpoint $previous"
fi
