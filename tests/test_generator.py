"""The runtime wrapper: LoRA fusing, torch vs onnxruntime parity, determinism, shapes."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from safefm.config import load_runtime_config
from safefm.generator import Generator
from safefm.models import Velocity
from safefm.tiny import tiny_model


@pytest.fixture()
def heat():
    return torch.rand(1, 9, 16, 16, generator=torch.Generator().manual_seed(0))


def _gen(runtime, tmp_path, monkeypatch, seed=0):
    monkeypatch.setenv("SAFEFM_CACHE", str(tmp_path))
    return Generator(tiny_model(seed), load_runtime_config(runtime=runtime, steps=4))


def test_lora_is_fused_without_changing_the_output(tmp_path, monkeypatch, heat):
    model = tiny_model(5)
    with torch.no_grad():  # make the LoRA matter
        for n, p in model.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([0.3])
    tokens = model.identity(torch.randn(1, 128))
    with torch.no_grad():
        ref = Velocity(model.unet, model.controlnet)(z, t, heat, tokens)
    monkeypatch.setenv("SAFEFM_CACHE", str(tmp_path))
    gen = Generator(model, load_runtime_config(runtime="torch"))
    assert not any("lora_" in k for k in gen.model.unet.state_dict())
    with torch.no_grad():
        out = gen.velocity(heat, tokens)(z, 0.3)
    assert torch.allclose(out, ref, atol=1e-5)


def test_generation_is_deterministic_and_shaped(tmp_path, monkeypatch, heat):
    gen = _gen("torch", tmp_path, monkeypatch)
    tokens = gen.identity_tokens(np.ones(128, np.float32))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    z1, z2 = gen.generate(heat, tokens, noise), gen.generate(heat, tokens, noise)
    assert z1.shape == (1, 4, 8, 8) and torch.equal(z1, z2)
    img = gen.decode(z1)
    assert img.shape == (1, 32, 32, 3) and img.dtype == np.uint8
    # different expressions give different faces
    z3 = gen.generate(torch.zeros_like(heat), tokens, noise)
    assert (z3 - z1).abs().max() > 1e-4


def test_onnx_runtime_matches_torch(tmp_path, monkeypatch, heat):
    pytest.importorskip("onnxruntime")
    g_t = _gen("torch", tmp_path, monkeypatch)
    g_o = _gen("onnx", tmp_path, monkeypatch)
    assert g_o.runtime == "onnx" and list(tmp_path.glob("onnx/*/velocity.onnx"))
    tokens = g_t.identity_tokens(np.ones(128, np.float32))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    heat2 = heat.expand(2, -1, -1, -1)
    z_t = g_t.generate(heat2, tokens, noise)
    z_o = g_o.generate(heat2, tokens, noise)  # batch of 2, item by item through the batch-1 graph
    assert torch.allclose(z_t, z_o, atol=1e-3)
    assert np.abs(g_t.decode(z_t).astype(int) - g_o.decode(z_o).astype(int)).max() <= 2
    z_prev = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    w_t = g_t.generate(heat2, tokens, noise, z_prev=z_prev, t0=0.5)    # warm start, both runtimes
    assert torch.allclose(w_t, g_o.generate(heat2, tokens, noise, z_prev=z_prev, t0=0.5), atol=1e-3)
    assert g_o.providers and g_t.providers is None


def count_network_calls(gen, monkeypatch) -> list[float]:
    """The flow times at which the generator's velocity network runs, appended as it runs."""
    times, inner = [], gen.backend.velocity

    def counting(cond, tokens):
        v = inner(cond, tokens)

        def counted(z, t):
            times.append(t)
            return v(z, t)
        return counted
    monkeypatch.setattr(gen.backend, "velocity", counting)
    return times


def test_warm_start_takes_the_rest_of_the_grid_from_the_previous_latent(tmp_path, monkeypatch, heat):
    gen = _gen("torch", tmp_path, monkeypatch)   # steps = 4: grid 0, 0.25, 0.5, 0.75, 1
    tokens = gen.identity_tokens(np.ones(128, np.float32))
    noise, z_prev, z_other = torch.randn(3, 1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = count_network_calls(gen, monkeypatch)
    cold = gen.generate(heat, tokens, noise)
    assert calls == [0.0, 0.25, 0.5, 0.75]
    calls.clear()
    warm = gen.generate(heat, tokens, noise, z_prev=z_prev, t0=0.5)
    assert calls == [0.5, 0.75]                                        # half the network calls
    v = gen.velocity(heat, tokens)
    x = 0.5 * noise + 0.5 * z_prev                                     # the path point at t = 0.5
    x = x + 0.25 * v(x, 0.5)
    assert torch.allclose(warm, x + 0.25 * v(x, 0.75), atol=1e-6)
    assert (warm - cold).abs().max() > 1e-3
    assert (gen.generate(heat, tokens, noise, z_prev=z_other, t0=0.5) - warm).abs().max() > 1e-3


def test_cuda_request_without_gpu_is_a_clear_error(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from safefm.errors import DeviceError
    with pytest.raises(DeviceError, match="no CUDA"):
        Generator(tiny_model(), load_runtime_config(device="cuda"))


def test_controlnet_scale_multiplies_the_adapter_residuals(tmp_path, monkeypatch, heat):
    from safefm.models import scale_controlnet

    model = tiny_model(3)
    with torch.no_grad():  # a trained-looking adapter: non-zero zero-convs
        for conv in [*model.controlnet.controlnet_down_blocks, model.controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
            conv.bias.normal_(0, 0.05)
    z, ts = torch.randn(1, 4, 8, 8), torch.tensor([300.0])
    tokens = model.identity(torch.randn(1, 128))
    with torch.no_grad():
        down1, mid1 = model.controlnet(z, ts, encoder_hidden_states=tokens, controlnet_cond=heat, return_dict=False)
        scale_controlnet(model.controlnet, 2.5)
        down2, mid2 = model.controlnet(z, ts, encoder_hidden_states=tokens, controlnet_cond=heat, return_dict=False)
    for a, b in zip([*down1, mid1], [*down2, mid2]):
        torch.testing.assert_close(b, 2.5 * a, atol=1e-5, rtol=1e-4)

    # through the runtime config: scale 0 is the bare base (heatmaps ignored)
    monkeypatch.setenv("SAFEFM_CACHE", str(tmp_path))
    trained = tiny_model(3)
    with torch.no_grad():
        for conv in [*trained.controlnet.controlnet_down_blocks, trained.controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    gen = Generator(trained, load_runtime_config(runtime="torch", controlnet_scale=0.0))
    for conv in [*gen.model.controlnet.controlnet_down_blocks, gen.model.controlnet.controlnet_mid_block]:
        assert not conv.weight.any()
    tok = gen.identity_tokens(np.ones(128, np.float32))
    v = gen.velocity(heat, tok)(z, 0.3)
    v0 = gen.velocity(torch.zeros_like(heat), tok)(z, 0.3)
    assert torch.equal(v, v0)



def test_lean_model_attends_only_in_the_middle_and_takes_the_identity_through_film(tmp_path, monkeypatch, heat):
    """configs/model_lean.toml's architecture: fewer operators, identity still steers the face,
    and onnxruntime runs the same graph as torch."""
    import dataclasses

    from safefm.tiny import tiny_model_config

    lean = dataclasses.replace(tiny_model_config(), unet_cross_attention="mid", identity_film=True)
    model = tiny_model(0, lean)
    kinds = [type(b).__name__ for b in (*model.unet.down_blocks, *model.unet.up_blocks)]
    assert not any("CrossAttn" in k for k in kinds) and model.unet.config.class_embed_type == "projection"
    assert model.controlnet.config.class_embed_type == "projection"
    monkeypatch.setenv("SAFEFM_CACHE", str(tmp_path))
    g_t = Generator(model, load_runtime_config(runtime="torch"))
    g_o = Generator(tiny_model(0, lean), load_runtime_config(runtime="onnx"))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = (g_t.identity_tokens(np.eye(128, dtype=np.float32)[i]) for i in (0, 1))
    z_a = g_t.generate(heat, a, noise)
    assert (z_a - g_t.generate(heat, b, noise)).abs().max() > 1e-4     # another identity, another face
    assert torch.allclose(z_a, g_o.generate(heat, a, noise), atol=1e-3)


def test_identity_guidance_extrapolates_from_the_null_identity_on_early_steps(tmp_path, monkeypatch, heat):
    gen = _gen("torch", tmp_path, monkeypatch)
    tokens = gen.identity_tokens(np.ones(128, np.float32))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    v_id = gen.velocity(heat, tokens)(z, 0.25)
    v_null = gen.velocity(heat, gen.null_tokens())(z, 0.25)
    assert (v_id - v_null).abs().max() > 1e-4          # the identity changes the velocity at all
    assert torch.allclose(gen.velocity(heat, tokens, guidance=0.0)(z, 0.25), v_null, atol=1e-6)
    v3 = gen.velocity(heat, tokens, guidance=3.0, until=0.5)
    assert torch.allclose(v3(z, 0.25), v_null + 3.0 * (v_id - v_null), atol=1e-5)
    assert torch.equal(v3(z, 0.75), gen.velocity(heat, tokens)(z, 0.75))   # past guidance_until: plain
    # another reference than the null identity (identity_repel: the real person's own embedding)
    ref = gen.identity_tokens(np.full(128, -0.5, np.float32))
    v_ref = gen.velocity(heat, ref)(z, 0.25)
    v_away = gen.velocity(heat, tokens, guidance=2.0, reference=ref)(z, 0.25)
    assert torch.allclose(v_away, v_ref + 2.0 * (v_id - v_ref), atol=1e-5)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = gen.generate(heat, tokens, noise)
    assert torch.equal(gen.generate(heat, tokens, noise, guidance=1.0), plain)
    assert (gen.generate(heat, tokens, noise, guidance=3.0) - plain).abs().max() > 1e-4


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_a_guided_step_runs_its_two_velocities_in_one_call(tmp_path, monkeypatch, heat, runtime):
    """The identity push (guidance against the person's own tokens) needs two velocities a
    step: one network call of twice the batch (onnxruntime: the batch-2 graph), the same
    velocities as two calls, for each face of a batch."""
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    gen = _gen(runtime, tmp_path, monkeypatch)
    tokens = gen.identity_tokens(np.ones(128, np.float32))
    ref = gen.identity_tokens(np.full(128, -0.5, np.float32))
    heat2 = torch.cat([heat, heat.flip(-1)])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    v_id, v_ref = gen.velocity(heat2, tokens)(z, 0.25), gen.velocity(heat2, ref)(z, 0.25)
    calls = []
    if runtime == "onnx":
        sess = gen.backend._velocity2
        assert sess is not None and list(tmp_path.glob("onnx/*/velocity2.onnx"))
        monkeypatch.setattr(gen.backend, "_velocity2", SimpleNamespace(
            run=lambda out, feeds: (calls.append(feeds["z"].shape[0]), sess.run(out, feeds))[1]))
        monkeypatch.setattr(gen.backend, "_velocity", None)   # no batch-1 call on a guided step
    else:
        net = gen.backend.velocity_net
        monkeypatch.setattr(gen.backend, "velocity_net", lambda z, *a: (calls.append(z.shape[0]), net(z, *a))[1])
    v = gen.velocity(heat2, tokens, guidance=2.0, until=0.5, reference=ref)(z, 0.25)
    assert calls == ([2, 2] if runtime == "onnx" else [4])    # per face (batch-1 graphs) / one batch
    assert torch.allclose(v, v_ref + 2.0 * (v_id - v_ref), atol=1e-5)


def _saved_detail_model(path):
    """A tiny model with ControlNet, LoRA and a detail stage, saved as a weights file (+ sidecar)."""
    import dataclasses

    from safefm.checkpoint import save_model
    from safefm.tiny import tiny_model_config
    model = tiny_model(3, dataclasses.replace(tiny_model_config(), detail_width=8, detail_blocks=1))
    with torch.no_grad():
        model.detail.tail.weight.normal_(0, 0.05)
    return save_model(model, path, dtype=torch.float32)


def _outputs(gen, heat):
    tokens = gen.identity_tokens(np.linspace(-1, 1, 128, dtype=np.float32))
    z = gen.generate(heat, tokens, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
    crop = gen.decode(z, heat)
    return tokens, z, crop, gen.refine(crop)


def test_load_runs_cached_graphs_without_building_the_model(tmp_path, monkeypatch, heat):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("SAFEFM_CACHE", str(tmp_path / "cache"))
    path = _saved_detail_model(tmp_path / "m.safetensors")
    cfg = load_runtime_config(runtime="onnx", steps=3)
    first = Generator.load(path, cfg)                  # exports the graphs
    again = Generator.load(path, cfg)                  # finds them: only the identity projector is built
    assert first.model is not None and again.model is None and again.has_detail
    for a, b in zip(_outputs(first, heat), _outputs(again, heat)):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b))
    rescaled = Generator.load(path, load_runtime_config(runtime="onnx", steps=3, controlnet_scale=0.5))
    assert rescaled.model is not None                  # other weights: their own export
    assert Generator.load(path, load_runtime_config(runtime="torch")).model is not None


def test_cached_load_does_not_import_diffusers(tmp_path, monkeypatch):
    """What safefm-cam pays at start-up: importing diffusers alone took 6-10 s."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("SAFEFM_CACHE", str(tmp_path / "cache"))
    path = _saved_detail_model(tmp_path / "m.safetensors")
    Generator.load(path, load_runtime_config(runtime="onnx"))     # exports the graphs
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    code = ("import sys; from safefm.config import load_runtime_config; from safefm.generator import Generator; "
            f"g = Generator.load({str(path)!r}, load_runtime_config(runtime='onnx')); "
            "print(g.model is None, 'diffusers' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["True", "False"], run.stderr[-2000:]


def test_concurrent_exports_of_the_same_graph_do_not_collide(tmp_path, monkeypatch):
    """Two workers exporting the same weights at once (batch workers, parallel evaluations: the
    export writes its file, then renames it) both finish with the graph in place and no
    temporary file left (a shared temporary name made the second rename fail)."""
    import threading
    import time

    from safefm import generator

    def slow_export(module, args, f, **kw):   # what torch.onnx.export does, slowly
        with open(f, "wb") as fh:
            fh.write(b"graph")
        time.sleep(0.3)
    monkeypatch.setattr(torch.onnx, "export", slow_export)
    path, errors = tmp_path / "g.onnx", []

    def work():
        try:
            generator._export(None, (), path, ["x"], ["y"])
        except Exception as exc:   # pragma: no cover - the failure this test is about
            errors.append(exc)
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors and path.read_bytes() == b"graph"
    assert [p.name for p in tmp_path.iterdir()] == ["g.onnx"]
