"""Live virtual camera (``safefm-cam``): capture -> engine -> virtual camera / preview / recorder.

Three threads joined by one-slot mailboxes (only the newest frame is ever kept):
:mod:`.capture` reads the camera, :mod:`.pipeline` runs the engine and paces the output to
the sinks in :mod:`.vcam` (pyvirtualcam, recorder) and :mod:`.preview`; :mod:`.tray` is the
system-tray control.
"""

from .capture import CaptureWorker, CvSource, EndOfStream, FrameSource, Packet, SourceInfo, open_source
from .mailbox import Mailbox, Pacer
from .pipeline import LiveConfig, OutFrame, Pipeline, Sink, check_result

__all__ = ["CaptureWorker", "CvSource", "EndOfStream", "FrameSource", "LiveConfig", "Mailbox",
           "OutFrame", "Packet", "Pacer", "Pipeline", "Sink", "SourceInfo", "check_result",
           "open_source"]
