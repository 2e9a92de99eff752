"""``safefm-cam``: anonymize a camera live and send it to a virtual camera.

    safefm-cam --identity id.pt                    # camera 0 -> "SAFE-FM Camera"
    safefm-cam --preview --record out.mp4 --no-vcam
    safefm-cam --source clip.mp4 --preview         # a video file played like a camera
    safefm-cam --source clip.mp4 --loop --no-vcam --record /dev/null --stats-log soak.csv

Until the model is warm and the first face is anonymized the virtual camera shows a
"SAFE-FM starting..." card, never the raw camera; camera faults and engine errors show a
card too. Pause (tray menu, preview key P, or SIGUSR1) sends the raw camera with a
"NOT ANONYMIZED" badge until you resume.

Virtual camera: Linux needs v4l2loopback:
  sudo modprobe v4l2loopback devices=1 video_nr=10 card_label="SAFE-FM Camera" exclusive_caps=1
Windows uses Unity Capture registered as "SAFE-FM Camera" if installed, else OBS Virtual
Camera; macOS uses OBS Virtual Camera (OBS 27+ installed, its virtual camera started once).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import LIVE_DEFAULTS
from ..errors import ConfigError, DeviceError, IdentityFileError, InputError, SafeFMError, WeightsError
from ..live.capture import open_source
from ..live.pipeline import LiveConfig, Pipeline
from ..live.preview import PreviewSink, PreviewWindow, display_available
from ..live.stats import StatsLog, format_stats
from ..live.tray import make_tray
from ..live.vcam import NullSink, RecorderSink, VirtualCamSink, vcam_candidates
from ..paths import default_identity_path, identities_dir
from .common import EXIT_OK, add_int8_args, add_logging_args, cli_main, runtime_config_from_args

EngineFactory = Callable[..., Any]

log = logging.getLogger("safefm.live")
DEFAULT_SIZE, DEFAULT_FPS = (640, 480), 30.0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="safefm-cam", description="Anonymize a camera live and send it to a virtual camera.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    src = ap.add_argument_group("input")
    src.add_argument("--camera", type=int, default=0, metavar="N", help="camera index (default 0)")
    src.add_argument("--source", metavar="FILE|URL", help="read a video file or stream instead")
    src.add_argument("--no-pace", action="store_true",
                     help="read --source as fast as it is anonymized (every frame is; tests, benchmarks)")
    src.add_argument("--loop", action="store_true",
                     help="play --source again at its end, until stopped (soak runs)")
    eng = ap.add_argument_group("engine")
    eng.add_argument("--identity", metavar="FILE", help="synthetic identity file "
                     "(default: weights/identities/default.pt)")
    eng.add_argument("--model", metavar="FILE", help="weights file, or a shipped model by name: default, large (weights/safefm_NAME.safetensors)")
    eng.add_argument("--steps", type=int, metavar="N", help="Euler steps per frame (default from the runtime config)")
    eng.add_argument("--identity-repel", type=float, metavar="R",
                     help="guide the face away from your own (dlib, once per face, in memory only) on the "
                          "first Euler step (repel_until); default 1.5 as for files, 0 = off (one network "
                          "call a frame fewer)")
    eng.add_argument("--detail-min-px", type=int, metavar="PX",
                     help="faces spanning at least PX pixels get the 2x detail stage (sharper, ~6 ms a face "
                          "on a 2-core CPU); off live (0) unless set here or in --config, e.g. 160")
    eng.add_argument("--seed", type=int, metavar="S", help="noise seed")
    eng.add_argument("--runtime", choices=["auto", "torch", "onnx"], help="inference runtime")
    add_int8_args(eng, "the camera's default: decoder")
    eng.add_argument("--compute", choices=["auto", "cpu", "cuda"], help="compute device (auto: a GPU "
                     "when the runtime has one; --device names the virtual camera here)")
    eng.add_argument("--config", metavar="FILE", help="runtime TOML (default: configs/runtime_default.toml)")
    eng.add_argument("--no-pipeline", action="store_true",
                     help="run each frame's stages one after another (default: consecutive frames "
                          "overlap: landmarks of the next frame while the generator runs this one)")
    out = ap.add_argument_group("output")
    out.add_argument("--device", help="virtual camera device (Linux: /dev/videoN; default: the "
                                      "v4l2loopback device labelled 'SAFE-FM Camera')")
    out.add_argument("--no-vcam", action="store_true", help="do not open a virtual camera")
    out.add_argument("--preview", action="store_true", help="show the output in a window (P/I/Q keys)")
    out.add_argument("--record", metavar="OUT.mp4", help="also write the output stream to a video file "
                     f"({os.devnull}: encode nothing, discard it)")
    out.add_argument("--width", type=int, default=0, help="output width (default: the camera's)")
    out.add_argument("--height", type=int, default=0, help="output height (default: the camera's)")
    out.add_argument("--fps", type=float, default=0, help="output frame rate (default: the camera's)")
    out.add_argument("--no-badge", action="store_true",
                     help="no 'NOT ANONYMIZED' badge on frames sent while paused")
    ui = ap.add_argument_group("interface")
    ui.add_argument("--no-tray", action="store_true", help="no system-tray icon")
    ui.add_argument("--stats", action="store_true",
                    help="print FPS, per-stage latency and dropped frames once a second")
    ui.add_argument("--seconds", type=float, default=0, metavar="S",
                    help="stop after S seconds (soak runs, scripts; default: run until stopped)")
    ui.add_argument("--stats-log", metavar="PATH",
                    help="write FPS, latency p50/p95 and resident memory once a second to PATH "
                         "(CSV for .csv, else JSON lines)")
    add_logging_args(ap)
    return ap


def _engine_factory(args, engine_factory: EngineFactory | None) -> Callable[[], Any]:
    """A zero-argument factory the processing thread calls (so the model loads behind the
    starting card)."""
    ns = argparse.Namespace(**vars(args))
    ns.device = args.compute                      # runtime_config_from_args reads .device
    cfg = runtime_config_from_args(ns, defaults=LIVE_DEFAULTS)

    def build():
        factory = engine_factory
        if factory is None:
            from ..engine import build_engine as factory
        return factory(cfg, model_path=args.model, identity_path=args.identity, video=True)
    return build


def _vcam_plan(args) -> list | None:
    """Virtual camera candidates, None to run without one; DeviceError when it is required."""
    if args.no_vcam:
        return None
    try:
        return vcam_candidates(device=args.device)
    except DeviceError as exc:
        if args.preview or args.record:
            log.warning("no virtual camera, continuing with %s only (%s)",
                        " and ".join(x for x, on in (("preview", args.preview), ("record", args.record)) if on),
                        "pass --no-vcam to skip it on purpose")
            return None
        raise exc


def _probe_source(args):
    """Open the source once for its size and fps; a missing camera is retried later."""
    try:
        src = open_source(args.camera, args.source, args.width, args.height, args.fps, args.loop)
        return src, src.info.width, src.info.height, src.info.fps
    except DeviceError as exc:
        if args.source:
            raise
        w, h = (args.width, args.height) if args.width and args.height else DEFAULT_SIZE
        log.warning("%s; sending a placeholder until it appears (%dx%d)", exc, w, h)
        return None, w, h, args.fps or DEFAULT_FPS


def run(args, engine_factory: EngineFactory | None = None) -> int:
    """Run ``safefm-cam`` until Ctrl+C, SIGTERM, tray Quit, preview Q or the source's end."""
    if args.preview and not display_available():
        raise DeviceError("--preview needs a display (none found: DISPLAY is not set)")
    if args.identity and not Path(args.identity).is_file():
        raise IdentityFileError(f"identity file not found: {args.identity}")
    if args.model and not Path(args.model).is_file():
        raise WeightsError(f"model file not found: {args.model}")
    if args.seconds < 0:
        raise ConfigError(f"--seconds must be >= 0 (0: until stopped), got {args.seconds:g}")
    if args.loop and not args.source:
        raise ConfigError("--loop plays a --source file again and again; a camera has no end")
    plan = _vcam_plan(args)
    if plan is None and not (args.preview or args.record):
        raise InputError("nothing to send to: use the virtual camera, --preview or --record")
    identity = Path(args.identity) if args.identity else default_identity_path()
    factory = _engine_factory(args, engine_factory)

    first, w, h, fps = _probe_source(args)
    sinks: list = []
    try:
        cfg = LiveConfig(width=args.width or w, height=args.height or h, fps=args.fps or fps,
                         pace=not args.no_pace, paused_badge=not args.no_badge,
                         pipelined=not args.no_pipeline)
        if plan is not None:
            try:
                sinks.append(VirtualCamSink(cfg.width, cfg.height, cfg.fps, plan))
            except DeviceError:
                if not (args.preview or args.record):
                    raise
                log.warning("virtual camera unavailable, continuing without it")
        if args.record:
            sinks.append(NullSink() if args.record == os.devnull else
                         RecorderSink(args.record, cfg.width, cfg.height, cfg.fps))
        stats_log = StatsLog(args.stats_log) if args.stats_log else None
    except BaseException:
        for s in sinks:
            s.close()
        if first is not None:
            first.close()
        raise
    preview_sink = PreviewSink() if display_available() else None
    if preview_sink is not None:
        sinks.append(preview_sink)

    def reopen():
        return open_source(args.camera, args.source, args.width, args.height, args.fps, args.loop)

    def on_stats(snap: dict) -> None:
        if stats_log is not None:
            stats_log.write(snap)
        if args.stats:
            print(format_stats(snap), flush=True)

    pipe = Pipeline(factory, reopen, sinks, cfg, first_source=first,
                    identity_path=identity if identity.is_file() else None,
                    on_stats=on_stats if (args.stats or stats_log) else None)
    quit_ev, want_preview = threading.Event(), threading.Event()
    if args.preview:
        want_preview.set()
    window = PreviewWindow(preview_sink, toggle_pause=pipe.toggle_pause,
                           next_identity=lambda: pipe.next_identity(identities_dir()),
                           quit=quit_ev.set) if preview_sink is not None else None
    signals: list[str] = []             # "quit" / "pause" from the signal handlers, served by the loops
    old = _install_signals(signals)
    timer = threading.Timer(args.seconds, quit_ev.set) if args.seconds else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    tray = None
    try:
        pipe.start()
        mac_tray = False
        if not args.no_tray:
            tray = make_tray(pipe, identities_dir(), quit_ev.set,
                             want_preview.set if window is not None else None)
            if tray is not None and platform.system() == "Darwin":
                if args.preview:
                    log.warning("tray skipped: on macOS the tray and the preview both need the main thread")
                    tray = None
                else:
                    mac_tray = True
            elif tray is not None and not tray.start():
                tray = None
        if not args.quiet:
            to = ", ".join(_describe(s) for s in sinks if not isinstance(s, PreviewSink)) or "preview"
            print(f"safefm-cam: running, {cfg.width}x{cfg.height} @ {cfg.fps:g} fps -> {to}; "
                  "Ctrl+C to quit", file=sys.stderr, flush=True)
        if mac_tray:
            threading.Thread(target=_stop_tray_when, args=(tray, quit_ev, pipe, signals), daemon=True).start()
            tray.run()
        else:
            _main_loop(quit_ev, want_preview, window, pipe, signals)
    except KeyboardInterrupt:
        pass
    finally:
        if timer is not None:
            timer.cancel()
        joined = pipe.stop()
        if tray is not None:
            tray.stop()
        if window is not None:
            window.close()
        _restore_signals(old)
        if stats_log is not None:
            stats_log.close()
        if not joined:
            log.warning("some threads did not stop within %.0f s", cfg.join_timeout)
    if pipe.error:
        raise SafeFMError(pipe.error)
    return EXIT_OK


def _describe(sink) -> str:
    if isinstance(sink, VirtualCamSink):
        return f"virtual camera {sink.device}"
    if isinstance(sink, (RecorderSink, NullSink)):
        return f"recording {sink.path}"
    return type(sink).__name__


def _serve_signals(signals: list, quit_ev: threading.Event, pipe) -> None:
    """Carry out what the signal handlers asked for (:func:`_install_signals`), in this thread."""
    while signals:
        if signals.pop(0) == "quit":
            quit_ev.set()
        else:
            pipe.toggle_pause()


def _main_loop(quit_ev: threading.Event, want_preview: threading.Event, window, pipe, signals: list) -> None:
    while not quit_ev.is_set() and not pipe.done.is_set():
        _serve_signals(signals, quit_ev, pipe)
        if quit_ev.is_set():
            break
        if window is not None and want_preview.is_set():
            want_preview.clear()
            window.show()
        if window is not None and window.open:
            window.tick(15)
        else:
            quit_ev.wait(0.05)


def _stop_tray_when(tray, quit_ev: threading.Event, pipe, signals: list) -> None:
    while not quit_ev.wait(0.1) and not pipe.done.is_set():
        _serve_signals(signals, quit_ev, pipe)
    tray.stop()


def _install_signals(signals: list) -> dict:
    """SIGINT / SIGTERM append "quit", SIGUSR1 "pause" to ``signals``; the main loop carries them
    out within 50 ms. A handler runs in the main thread between two bytecodes, maybe while that
    thread holds a lock (inside ``Event.wait``, or pausing from the preview window): setting an
    Event or pausing right in the handler could wait for that lock forever (seen: Ctrl+C once
    left the camera running), so a handler only appends to a list."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}
    handlers = {signal.SIGINT: "quit", signal.SIGTERM: "quit"}
    if hasattr(signal, "SIGUSR1"):
        handlers[signal.SIGUSR1] = "pause"
    for sig, what in handlers.items():
        old[sig] = signal.signal(sig, lambda signum, frame, what=what: signals.append(what))
    return old


def _restore_signals(old: dict) -> None:
    for sig, fn in old.items():
        signal.signal(sig, fn)


def main(argv: Sequence[str] | None = None, engine_factory: EngineFactory | None = None) -> int:
    """``engine_factory(runtime_cfg, model_path=None, identity_path=None, video=True)`` defaults
    to :func:`safefm.engine.build_engine` (tests pass fakes)."""
    return cli_main(build_parser(), lambda args: run(args, engine_factory), argv)


if __name__ == "__main__":
    sys.exit(main())
