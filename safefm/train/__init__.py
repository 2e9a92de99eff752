"""Training of the SAFE-FM default model, in stages (see ``scripts/train.py``):

1. ``ae`` (:mod:`.autoencoder`): AutoencoderTiny on aligned crops, then latent mean/std and
   the latent cache (every crop and its mirror encoded once);
2. ``base`` (:mod:`.base`): UNet + IdentityProjector, flow matching on cached latents;
3. ``adapters`` (:mod:`.adapters`): ControlNet on landmark heatmaps + LoRA, base frozen;
4. ``sampler``: :class:`safefm.identity_sampler.IdentitySampler` over training embeddings.

:func:`.export.export_default` writes the shipped safetensors file.
"""
