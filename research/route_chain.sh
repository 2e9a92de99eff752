#!/usr/bin/env bash
# The route of sessions 23-26 (docs/training.md, docs/results.md): every flow stage retrained on the
# retrained autoencoder (runs/<route>/ae/last.pt, 28.5 dB held back against the shipped 25.6),
# then the later stages: the heatmap decoder (the decoder alone, so first), one reflow pass, the
# context adapters, the 2x detail stage. `all` skips a stage whose export exists, and every
# training stage resumes from its own runs/<route>/<stage>/last.pt,
# so the chain can be stopped anywhere and run again (a CPU session at a time, or on a GPU with
# DEVICE=cuda). Nothing here is shipped; weights/ changes only by hand after the evaluations.
#
#   ROUTE=runs/s23/route MIN=70 bash research/route_chain.sh base      # one stage (more minutes: run again)
#   ROUTE=runs/s23/route bash research/route_chain.sh all              # what is left, in order
#
# The latent cache (data_cache/latents.npz) must be the route autoencoder's (its ae_step 10559),
# not the shipped one's (1498): `python scripts/train.py --stage cache --runs $ROUTE --cache-limit 0`.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${ROUTE:-runs/s23/route}
MIN=${MIN:-30}
T=${THREADS:-2}
X=$R/export
mkdir -p "$X"

# base and adapters refuse a cache of another autoencoder step themselves (scripts/train.py open_cache);
# the context stage reads the cache too but knows only its --from model, so it is checked here.
check_cache() {
  python - "$R" <<'EOF'
import sys, numpy as np, torch
from safefm.train.data import cache_root
ae = torch.load(f"{sys.argv[1]}/ae/last.pt", map_location="cpu", weights_only=False)["step"]
with np.load(cache_root() / "latents.npz") as z:
    got = int(z["ae_step"])
if got != ae:
    sys.exit(f"data_cache/latents.npz was encoded by an autoencoder at step {got}, the route's is at {ae}: "
             f"run --stage cache --runs {sys.argv[1]} --cache-limit 0 first")
EOF
}

stage() {
  case "$1" in
    base)      python scripts/train.py --stage base --runs "$R" --config configs/model_lean.toml --threads "$T" --max-minutes "$MIN" ;;
    adapters)  python scripts/train.py --stage adapters --runs "$R" --threads "$T" --lr 6e-4 --max-steps 4000 --max-minutes "$MIN" ;;
    export)    python scripts/train.py --stage export --runs "$R" --controlnet-scale 4 --out "$X/flow.safetensors" ;;
    reflow)    python scripts/train.py --stage reflow --runs "$R" --from "$X/heat.safetensors" --pairs 2048 --teacher-steps 10 \
                   --threads "$T" --max-minutes "$MIN"
               python scripts/train.py --stage reflow-export --runs "$R" --from "$X/heat.safetensors" --out "$X/reflow.safetensors" ;;
    context)   check_cache
               python scripts/train.py --stage context --runs "$R" --from "$X/reflow.safetensors" --threads "$T" --max-minutes "$MIN"
               python scripts/train.py --stage context-export --runs "$R" --from "$X/reflow.safetensors" --out "$X/context.safetensors" ;;
    heat)      python scripts/train.py --stage heat-decoder --runs "$R" --from "$X/flow.safetensors" --threads "$T" \
                   --max-minutes "$MIN" --out "$X/heat.safetensors" ;;
    detail)    [ -f "$R/detail_pack.npz" ] || python scripts/train.py --stage detail-data --from "$X/context.safetensors" \
                   --real 4000 --sampled 1500 --pack "$R/detail_pack.npz"
               python scripts/train.py --stage detail --runs "$R" --pack "$R/detail_pack.npz" --threads 1 --max-minutes "$MIN" \
                   --detail "width=32,blocks=2,adv=0.1,fm=3,batch=16,steps=400000,gan_start=300" ${DEVICE:+--device $DEVICE}
               python scripts/train.py --stage detail-export --runs "$R" --from "$X/context.safetensors" --out "$X/route.safetensors" ;;
    *) echo "unknown stage $1 (base adapters export heat reflow context detail all)" >&2; exit 2 ;;
  esac
}

if [ "${1:-all}" = all ]; then
  for s in export heat reflow context detail; do
    case $s in
      export)  [ -f "$X/flow.safetensors" ] && continue ;;
      reflow)  [ -f "$X/reflow.safetensors" ] && continue ;;
      context) [ -f "$X/context.safetensors" ] && continue ;;
      heat)    [ -f "$X/heat.safetensors" ] && continue ;;
      detail)  [ -f "$X/route.safetensors" ] && continue ;;
    esac
    stage "$s"
  done
else
  stage "$1"
fi
