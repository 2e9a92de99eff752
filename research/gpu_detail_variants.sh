#!/bin/bash
# Session 25 (docs/results.md, docs/training.md): seven detail-stage variants trained side by
# side on one lent GPU, 6.5 minutes each, from the pack .gpu/pack.npz (scripts/train.py --stage
# detail-data --real 6000 --sampled 2000, plus 1,500 more outputs). Run from the repository root
# with PYTHONPATH=$PWD and OUT set; the checkpoints and logs land in $OUT. Not shipped: none
# looked better than the shipped stage.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import torch,cv2,numpy;print(torch.__version__,torch.cuda.is_available(),cv2.__version__,numpy.__version__)"
MIN=${MIN:-6.5}
COMMON="batch=96,steps=10000000,sampled_fraction=0.5,fm=3,gan_start=500"
declare -A V
V[a_w32b2_c4]="width=32,blocks=2,coarse=4,consistency=0.1,adv=0.1,$COMMON"
V[b_w32b6_c4]="width=32,blocks=6,coarse=4,consistency=0.1,adv=0.1,$COMMON"
V[c_w32b6_c8]="width=32,blocks=6,coarse=8,consistency=0.05,adv=0.2,$COMMON"
V[d_w48b8_c8]="width=48,blocks=8,coarse=8,consistency=0.05,adv=0.2,$COMMON"
V[e_w48b8_c16]="width=48,blocks=8,coarse=16,consistency=0.05,adv=0.2,$COMMON"
V[f_w48b8_c16a5]="width=48,blocks=8,coarse=16,consistency=0.02,adv=0.5,$COMMON"
V[g_w64b10_c8]="width=64,blocks=10,coarse=8,consistency=0.05,adv=0.2,$COMMON"
mkdir -p /tmp/r /tmp/logs
for k in "${!V[@]}"; do
  python3 scripts/train.py --stage detail --device cuda --threads 2 --pack .gpu/pack.npz --runs /tmp/r/$k \
     --max-minutes $MIN --detail "${V[$k]}" > /tmp/logs/$k.log 2>&1 &
done
sleep 45; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; tail -n 3 /tmp/logs/*.log
wait
for k in "${!V[@]}"; do cp /tmp/r/$k/detail/last.pt $OUT/$k.pt; tail -n 4 /tmp/logs/$k.log; done
tar -C /tmp -cf $OUT/logs.tar logs
ls -la $OUT
