"""The face geometry and pixels of one frame: landmarks, alignment, retargeting, heatmaps, compositing.

Pure functions and small stateful trackers used by :mod:`safefm.engine`; no model code here."""
