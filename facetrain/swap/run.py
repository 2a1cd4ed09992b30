"""`loratrain face swap`: decode -> find faces -> predict (batched) -> merge, label and encode, overlapped.

Three threads and the caller: a reader decodes frames; a finder detects (or looks up in a dst faceset),
filters by identity, smooths and aligns the faces; the calling thread predicts them in batches; a writer
merges, labels and encodes them in frame order. OpenCV, onnxruntime, torch and ffmpeg release the GIL, so
the stages overlap. What happens to one frame lives in `frame.py`, which the UI's preview calls as well. Everything that can be wrong with the input, the model or the output is checked before
the model loads.

With an XSeg segmenter the result also lists the frames where something covers a face (the occlusion report,
docs/face-swap.md#occlusion-report), worst first: those are the frames a user should look at first.
"""
from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, job
from loratrain.core.progress import Reporter, StopFlag

from ..extract.plugins import IdentityEncoder
from .compose import FaceCrop, MergeOptions
from .config import SwapConfig
from .frame import FaceFinder, Prediction, check_model, compose_frame, find_crops, open_segmenter, output_size, predict_crops, to_work
from .media import ResumeState, Source, VideoSink, fingerprint, open_source, write_frame_image, write_image
from .predict import open_predictor
from .smooth import Smoother

#: options that do not change a pixel of the output (everything else is part of the resume key)
NOT_IN_KEY = {"output", "overwrite", "quiet", "batch_size", "device", "output_frames", "occlusion_threshold"}
#: frames of the occlusion report named in the summary (the result holds them all)
SHOWN_OCCLUDED = 10


@dataclass
class SwapResult(JobResult):
    output: str = ""
    frames: int = 0
    faces: int = 0
    frames_without_face: int = 0
    faces_skipped: int = 0
    other_people: int = 0
    resumed_at: int = -1
    seconds: float = 0.0
    occlusion_threshold: float | None = None  # None: no --xseg_model, nothing measured
    occluded: list[tuple[int, float]] = field(default_factory=list)  # (frame, worst face's hidden share), worst first

    def summary(self) -> list[str]:
        rate = self.frames / self.seconds if self.seconds else 0.0
        lines = [f"{self.faces} face(s) swapped in {self.frames} frame(s) ({rate:.1f} frames/s); {self.frames_without_face} "
                 f"frame(s) without a face; {self.faces_skipped} face(s) too small to paste; {self.other_people} face(s) of "
                 "other people left alone"]
        if self.occlusion_threshold is not None:
            lines.append(self._occlusion_line())
        if self.resumed_at >= 0:
            lines.append(f"resumed a stopped swap at frame {self.resumed_at}")
        if self.stopped:
            lines.append("stopped: run the same command again to continue (finished segments are kept)")
        else:
            lines.append(f"wrote {self.output} (labelled AI-generated)")
        return lines


    def _occlusion_line(self) -> str:
        limit = f"more than {self.occlusion_threshold:.0%} of a face covered"
        if not self.occluded:
            return f"XSeg: no frame with {limit}"
        shown = ", ".join(f"{index} ({share:.0%})" for index, share in self.occluded[:SHOWN_OCCLUDED])
        more = f" and {len(self.occluded) - SHOWN_OCCLUDED} more" if len(self.occluded) > SHOWN_OCCLUDED else ""
        return f"XSeg: {len(self.occluded)} frame(s) with {limit}, worst first (check these): {shown}{more}"


@dataclass
class Item:
    index: int
    frame: np.ndarray                     # float32 BGR 0..1
    crops: list[FaceCrop] = field(default_factory=list)
    predicted: list[Prediction] = field(default_factory=list)
    smoother: dict | None = None          # tracker state before this frame (segment starts only)


def _check_outputs(cfg: SwapConfig, source: Source) -> None:
    out = Path(cfg.output)
    if cfg.output_kind == "image" and source.kind != "image":
        raise ConfigError(f"output {out} is one image but {cfg.input} has {source.count} frames: give a video file or a folder")
    if cfg.output_kind == "video" and out.suffix.lower() == ".webm":
        raise ConfigError(f"output {out}: .webm cannot hold the H.264 video this writes; use .mp4, .mkv or .mov")
    if out.resolve() == Path(cfg.input).resolve():
        raise ConfigError(f"output {out} is the input: choose another path")
    if cfg.output_kind in ("video", "image") and out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    for folder in [p for p in (out if cfg.output_kind == "frames" else None, Path(cfg.output_frames) if cfg.output_frames else None) if p]:
        if folder.is_file():
            raise ConfigError(f"output {folder} is a file, not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not (folder / ".swap-state.json").exists() and not cfg.overwrite:
            raise ConfigError(f"{folder} is not empty; pass --overwrite or choose another folder")


def _spawn(fn: Callable[[], None], errors: list[BaseException]) -> threading.Thread:
    """Run `fn` in a daemon thread; an exception is handed to the caller's thread through `errors`."""
    def work() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            errors.append(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def _threaded(fn: Callable[[], Iterator[Any]], maxsize: int, errors: list[BaseException]) -> queue.Queue:
    """Run a generator in a thread, feeding a bounded queue; None ends it (after an error too)."""
    q: queue.Queue = queue.Queue(maxsize)

    def feed() -> None:
        try:
            for x in fn():
                q.put(x)
        finally:
            q.put(None)

    _spawn(feed, errors)
    return q


@job
def run_face_swap(cfg: SwapConfig, reporter: Reporter, stop: StopFlag) -> SwapResult:
    """Swap the trained face onto every face of a video, a frame folder or an image; label every output.

    cfg: a SwapConfig. stop ends after the current frame; a video keeps its finished segments and the next
    identical run continues from there. Result: frames and faces done, and where the output is.
    """
    t0 = time.perf_counter()
    source = open_source(cfg.input, cfg.fps)
    _check_outputs(cfg, source)
    first = cfg.start
    end = min(cfg.end or source.count, source.count) if source.kind != "video" else cfg.end
    if source.kind != "video" and first >= source.count:
        raise ConfigError(f"start {first} is past the last frame of {cfg.input} ({source.count} frames)")
    out = Path(cfg.output)
    kind = cfg.output_kind
    parts = out.with_name(f".{out.name}.swap-parts") if kind == "video" else out
    key_fields = {k: v for k, v in cfg.model_dump().items() if k not in NOT_IN_KEY}
    if cfg.xseg_model:  # a retrained segmenter at the same path changes the masks
        st = Path(cfg.xseg_model).stat()
        key_fields["xseg_model_id"] = [Path(cfg.xseg_model).name, st.st_size, st.st_mtime_ns]
    else:  # no segmenter: the same key as before the option existed, so such a stopped swap still resumes
        key_fields.pop("xseg_model")
    if cfg.recognizer:  # which faces pass the --reference filter depends on the recogniser's file too
        st = Path(cfg.recognizer).stat()
        key_fields["recognizer_id"] = [Path(cfg.recognizer).name, st.st_size, st.st_mtime_ns]
    else:  # dlib, as before the option existed (0 now means its 0.6): the same key, so such a stopped swap resumes
        key_fields.pop("recognizer")
        key_fields["identity_threshold"] = cfg.identity_threshold or IdentityEncoder.default_threshold
    if cfg.swapper:  # the pixels depend on the swapper, the source photos and the restorer files too
        from .swapper_predict import file_ids

        key_fields.update(file_ids(cfg))
    else:  # a --model swap: the same key as before the swapper options existed, so such a stopped swap still resumes
        for name in ("swapper", "source", "restore_model", "restore_blend", "restore_fidelity"):
            key_fields.pop(name)
    key = fingerprint(cfg, key_fields)
    state = ResumeState(parts, key, "state.json" if kind == "video" else ".swap-state.json")
    resumed = kind != "image" and state.load(cfg.overwrite, str(parts))
    if not resumed and kind == "video" and parts.exists():
        shutil.rmtree(parts)

    signer = None
    if cfg.c2pa_cert:
        from .label import C2paSigner

        signer = C2paSigner(cfg.c2pa_cert, cfg.c2pa_key, cfg.c2pa_alg, cfg.model_file)
    tools: list = []  # the detector and landmarker, built once for the swapper's sources and the frames alike
    predictor = open_predictor(cfg, tools)
    face_type = check_model(cfg, predictor)
    segmenter = open_segmenter(cfg)
    finder = FaceFinder(cfg, source, tools)
    smoother = Smoother(source.fps, cfg.smooth, cfg.smooth_min_cutoff, cfg.smooth_beta)
    start_at = state.next_frame if resumed and state.next_frame is not None else first
    if resumed:
        smoother.restore(state.smoother)
    else:
        state.segments = []
    seg = cfg.segment_frames
    result = SwapResult(output=str(out), resumed_at=start_at if resumed else -1,
                        occlusion_threshold=cfg.occlusion_threshold if segmenter is not None else None)
    opts = MergeOptions.of(cfg)
    r = predictor.resolution
    errors: list[BaseException] = []

    stopped_early: list[bool] = []

    def read() -> Iterator[tuple[int, np.ndarray]]:
        for index, rgb in source.frames(start_at, end or 0):
            if stop.is_set():
                stopped_early.append(True)
                return
            yield index, rgb

    frames_q = _threaded(read, 4, errors)

    def find() -> Iterator[Item]:
        while (got := frames_q.get()) is not None:
            index, rgb = got
            boundary = (index - first) % seg == 0
            item = Item(index, to_work(rgb), smoother=smoother.state() if boundary else None)
            item.crops = find_crops(item.frame, rgb, index, finder, r, face_type, smoother)
            yield item

    found_q = _threaded(find, 8, errors)
    to_write: queue.Queue = queue.Queue(16)
    sink = VideoSink(out, parts, source.fps, output_size(cfg.mode, source.size, r), cfg.crf) if kind == "video" else None
    frames_dir = out if kind == "frames" else Path(cfg.output_frames) if cfg.output_frames else None
    if frames_dir is not None:
        frames_dir.mkdir(parents=True, exist_ok=True)
    image: list[np.ndarray] = []  # an image output is written once the run is known to have found a face
    total = (end or source.count) - start_at
    reporter.start(max(total, 0), "swapping faces", unit="frame")

    def write() -> None:
        while (item := to_write.get()) is not None:
            if stop.is_set():  # drain what is queued without writing it: the open segment is dropped
                stopped_early.append(True)
                continue
            done = compose_frame(item.index, item.frame, item.crops, item.predicted, opts, cfg.visible_mark, r)
            result.faces += done.faces
            result.faces_skipped += done.skipped
            if done.occluded and max(done.occluded) > cfg.occlusion_threshold:
                result.occluded.append((item.index, round(max(done.occluded), 4)))
            if not item.crops:
                result.frames_without_face += 1
            bgr = done.bgr
            if item.smoother is not None and item.index > start_at:  # a segment ends here
                if sink is not None:
                    state.segments.append(sink.close())
                state.save(item.index, item.smoother)
            if sink is not None:
                if sink.writer is None:
                    sink.open(f"seg_{(item.index - first) // seg:05d}.mp4")
                sink.write(bgr)
            if frames_dir is not None:
                write_frame_image(frames_dir, source.frame_name(item.index), bgr, cfg.model_file, signer)
            if kind == "image":
                image.append(bgr)
            result.frames += 1
            reporter.advance()

    writer = _spawn(write, errors)

    def hand_over(x: Item | None) -> None:
        """Queue for the writer, unless it has died (its error is raised below)."""
        while writer.is_alive():
            try:
                to_write.put(x, timeout=0.2)
                return
            except queue.Full:
                pass

    try:
        # Batches are fixed runs of frames inside one segment, never "whatever is queued": a model's output can
        # differ in the last bit with the batch it ran in, and a resumed swap must redo a segment exactly.
        def window(index: int) -> tuple[int, int]:
            return (index - first) // seg, ((index - first) % seg) // cfg.batch_size

        batch: list[Item] = []
        finished = False
        while not finished:
            item = found_q.get()
            finished = item is None
            if batch and (finished or window(item.index) != window(batch[0].index)):
                pred = predict_crops(predictor, [c for b in batch for c in b.crops], segmenter)
                k = 0
                for b in batch:
                    b.predicted, k = pred[k:k + len(b.crops)], k + len(b.crops)
                for b in batch:
                    hand_over(b)
                batch = []
            if item is not None:
                batch.append(item)
            if errors:
                break
    finally:
        hand_over(None)
        writer.join()
        reporter.done("")
    if errors:
        if sink is not None:
            sink.abort()
        raise errors[0]
    result.seconds, result.other_people = time.perf_counter() - t0, finder.other_people
    result.occluded.sort(key=lambda x: (-x[1], x[0]))
    if stopped_early:
        result.stopped = True
        if sink is not None:
            sink.abort()
        return result
    if result.faces == 0 and result.faces_skipped == 0 and result.other_people == 0 and not resumed:
        if sink is not None:
            sink.abort()
            shutil.rmtree(parts, ignore_errors=True)
        what = "the image" if source.kind == "image" else f"any of the {result.frames} frame(s)"
        raise ConfigError(f"{cfg.input}: no face found in {what}; nothing written (try --upsample 1, a lower --min_face, "
                          "or --dst_faceset with faces extracted from these frames)")
    if sink is not None:
        if sink.writer is not None:
            state.segments.append(sink.close())
        last = start_at + result.frames
        sink.join(state.segments, source, first, last - first, cfg.model_file, signer)
    elif image:
        write_image(out, image[-1], cfg.model_file, signer)
    elif kind == "frames":
        (out / ".swap-state.json").unlink(missing_ok=True)
    return result
