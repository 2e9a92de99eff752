"""The flow stages data-parallel (2 CPU processes, gloo, started by ``torchrun`` as
``accelerate launch --multi_gpu`` does on GPUs): every process trains
on its own batches, gradients are synchronised (both end with identical weights), only the
main process writes the checkpoint, and the checkpoint resumes in a plain single process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

DRIVER = r'''
import hashlib, sys
from pathlib import Path
import numpy as np, torch
from safefm.face.alignment import load_template
from safefm.config import ModelConfig
from safefm.train.data import LatentCache
from safefm.models import Velocity
from safefm.train.accel import Runner
from safefm.train.base import FlowTrainConfig, base_keys, base_model, train_flow_stage

out = Path(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(1)
cfg = ModelConfig(image_size=32, latent_channels=4, latent_downscale=8, ae_width=8, ae_blocks=(1, 1, 1, 1),
                  unet_channels=(8, 16), unet_layers_per_block=1, unet_attention_head_dim=8, identity_dim=128,
                  identity_tokens=2, cross_attention_dim=16, heatmap_channels=9, heatmap_size=32,
                  controlnet_embedding_channels=(4, 8, 8, 16), lora_rank=2, lora_alpha=2, decoder="tiny")
rng = np.random.default_rng(0)
cache = LatentCache(arrays={"z": rng.normal(size=(16, *cfg.latent_shape)).astype(np.float16),
                            "embeddings": rng.normal(0, 0.1, (16, 128)).astype(np.float32),
                            "landmarks": np.stack([load_template() * 32] * 16).astype(np.float16),
                            "image_size": np.array(32)})
model = base_model(cfg)
runner = Runner()
params = [p for n, p in model.named_parameters() if n.startswith(("unet.", "identity."))]
ck = train_flow_stage("base", cfg, FlowTrainConfig(batch=2, max_steps=int(sys.argv[2]), ckpt_every=2), cache,
                      model=model, velocity=Velocity(model.unet, None), params=params, keys=base_keys(model),
                      metrics={}, heat_size=None, seed_salt=0, title="t", run_dir=out / "base",
                      max_minutes=0, resume=True, log=lambda *a: None, runner=runner)
state = model.state_dict()
h = hashlib.sha256(b"".join(state[k].detach().cpu().numpy().tobytes() for k in sorted(base_keys(model))))
(out / f"rank{runner.rank}-of-{runner.world}.txt").write_text(f"{h.hexdigest()} {ck['step']} {ck['metrics']['processes']}")
'''


@pytest.mark.slow
def test_base_stage_data_parallel_in_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(driver), str(tmp_path), "3"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = sorted(tmp_path.glob("rank*-of-2.txt"))
    assert [p.name for p in ranks] == ["rank0-of-2.txt", "rank1-of-2.txt"]
    (h0, step0, procs0), (h1, _, _) = (p.read_text().split() for p in ranks)
    assert h0 == h1                          # gradients were synchronised: one model, two processes
    assert step0 == "3" and procs0 == "2"
    assert (tmp_path / "base" / "last.pt").is_file() and not list((tmp_path / "base").glob("*.tmp"))

    # the same checkpoint continues in one plain process (no accelerate), from step 3 to 4
    solo = subprocess.run([sys.executable, str(driver), str(tmp_path), "4"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert solo.returncode == 0, solo.stderr[-3000:]
    h, step, procs = (tmp_path / "rank0-of-1.txt").read_text().split()
    assert step == "4" and procs == "1" and h != h0
    shutil.rmtree(tmp_path / "base")
