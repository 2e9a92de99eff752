"""SAFE-FM: real-time face anonymization by conditional flow matching.

One frame's path: ``landmarks`` (MediaPipe FaceMesh) -> ``alignment`` (similarity crop)
-> ``retarget`` (expression onto the identity's shape) -> ``heatmaps`` -> ``generator``
(UNet + ControlNet + LoRA, identity tokens) driven by ``sampler`` (Euler ODE over the
convention in ``flow``) -> ``composite`` (paste back) under the fail-closed policy of ``engine``.
"""

__version__ = "0.1.0"
