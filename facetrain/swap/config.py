"""Options of `loratrain face swap`, with DeepFaceLab's merger names where it has one (docs/face-swap.md#merger).

Light to import (no OpenCV, no torch): the CLI builds its flags and the UI its form from this class.
"""
from __future__ import annotations

from pathlib import Path

from loratrain.core.config import JobConfig, opt
from loratrain.core.devices import DEVICES
from loratrain.core.errors import Problem

from ..extract.config import PLUGINS, VIDEO_EXTENSIONS
from ..face_types import FACE_TYPES

MASK_MODES = ("full", "dst", "learned-prd", "learned-dst", "learned-prd*learned-dst", "learned-prd+learned-dst")
#: DFL's modes 6-9: they read a segmenter's masks, so they need --xseg_model (MASK_MODES need only the face model)
XSEG_MASK_MODES = ("XSeg-prd", "XSeg-dst", "XSeg-prd*XSeg-dst", "learned-prd*learned-dst*XSeg-prd*XSeg-dst")
BLEND_MODES = ("original", "overlay", "hist-match", "seamless", "seamless-hist-match", "raw-rgb", "raw-predict")
SWAP_CT_MODES = ("none", "rct", "lct", "mkl", "mkl-m", "idt", "idt-m", "sot", "sot-m")
IMAGE_OUTPUTS = {".png", ".jpg", ".jpeg"}
MODEL_SUFFIXES = {".safetensors", ".onnx", ".dfm"}
C2PA_ALGS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")


class SwapConfig(JobConfig):
    input: str = opt("", "a video, a folder of frames or one image", positional=True, path="any", group="input and output")
    model: str = opt("", "the trained face.safetensors, or an exported .onnx / .dfm (or --swapper instead)", path="file",
                     group="input and output")
    swapper: str = opt("", "instead of --model: an identity-injection swapper (.onnx, inswapper-style) that puts the "
                       "person of --source into every face, no training; needs --source and --recognizer", path="file",
                       group="input and output")
    source: list[str] = opt([], "with --swapper: images of the person to put in, or one folder of them (the largest face "
                            "of each; their recogniser embeddings are averaged)", path="any", group="input and output")
    output: str = opt("", "a video file (.mp4, .mkv, ...), an image file, or a folder for frames", positional=True,
                      path="output", group="input and output")
    output_frames: str = opt("", "also write the swapped frames as PNG into this folder (video output)", path="output",
                             group="input and output")
    overwrite: bool = opt(False, "replace an existing output (otherwise refused; a stopped run of the same swap resumes)",
                          group="input and output")
    start: int = opt(0, "first frame to swap (previews)", ge=0, group="input and output")
    end: int = opt(0, "stop before this frame (0 = to the end)", ge=0, group="input and output")
    fps: float = opt(0.0, "frame rate of a video made from frames or an image (0: the source's, 25 for frames)", ge=0,
                     group="input and output")
    crf: int = opt(18, "video quality (x264 CRF: lower is better, 18 is visually lossless)", ge=0, le=51, group="input and output")
    segment_frames: int = opt(48, "frames per encoded video segment: a resumed swap keeps every finished segment", ge=1,
                              group="input and output", advanced=True)
    # ---- faces
    dst_faceset: str = opt("", "reuse faces already extracted from these frames (matched by source file), as DFL's merger does",
                           path="dir", group="faces")
    face_type: str = opt("", "crop of the model (default: what the model file says; wf for a foreign .dfm)",
                         choices=["", *FACE_TYPES], group="faces")
    detector: str = opt("dlib", "face detector plugin: dlib (HOG), dlib_cnn, or scrfd with --detector_model",
                        registry=f"{PLUGINS}:DETECTORS", group="faces")
    detector_model: str = opt("", "ONNX file for an ONNX detector", path="file", group="faces", advanced=True)
    landmarker: str = opt("dlib68", "landmark plugin: dlib68, or 2dfan4 with --landmarker_model", registry=f"{PLUGINS}:LANDMARKERS",
                          group="faces")
    landmarker_model: str = opt("", "ONNX file for an ONNX landmarker", path="file", group="faces", advanced=True)
    upsample: int = opt(0, "detector upsampling (finds smaller faces, slower)", ge=0, le=3, group="faces")
    min_face: int = opt(40, "ignore detections smaller than this many pixels", group="faces")
    min_score: float = opt(0.0, "ignore detections scoring below this", group="faces")
    max_faces: int = opt(0, "swap at most this many faces per frame, largest first (0 = all)", ge=0, group="faces")
    reference: list[str] = opt([], "only swap faces close to these face files (dlib identity embedding, or --recognizer's)",
                               path="file", group="faces")
    recognizer: str = opt("", "an ArcFace-style face recogniser (ONNX file, input N x 3 x 112 x 112) for --reference: "
                          "cosine distance of its embeddings instead of dlib's", path="file", group="faces")
    identity_threshold: float = opt(0.0, "identity distance under which a face counts as the reference person (0 = the "
                                    "encoder's default: 0.6, dlib's Euclidean or the recogniser's cosine distance)", ge=0,
                                    group="faces")
    smooth: bool = opt(True, "temporal smoothing of the landmarks (one-euro filter) so the face does not jitter",
                       group="faces")
    smooth_min_cutoff: float = opt(0.4, "one-euro: cutoff (Hz) when the face is still; lower is steadier", gt=0,
                                   group="faces", advanced=True)
    smooth_beta: float = opt(10.0, "one-euro: how fast the cutoff rises with motion (per face width per second)", ge=0,
                             group="faces", advanced=True)
    # ---- model
    batch_size: int = opt(8, "faces predicted together", ge=1, group="model")
    morph_value: float = opt(1.0, "for .dfm models with a morph_value input (AMP): 0..1", ge=0, le=1, group="model")
    device: str = opt("auto", "auto, cpu or cuda (torch models; ONNX uses its best provider)", choices=DEVICES, group="model")
    restore_model: str = opt("", "with --swapper: a face restoration model run on each swapped face (.onnx, GFPGAN / "
                             "CodeFormer-style: N x 3 x S x S in and out at -1..1, FFHQ-aligned crop)", path="file",
                             group="model", advanced=True)
    restore_blend: float = opt(0.8, "how much of the restored face replaces the swapped one (0 = none, 1 = all)", ge=0,
                               le=1, group="model", advanced=True)
    restore_fidelity: float = opt(0.5, "CodeFormer's weight input (0 = sharper, 1 = closer to the swapped face); models "
                                  "without it ignore it", ge=0, le=1, group="model", advanced=True)
    # ---- merge (DFL's merger options)
    mode: str = opt("overlay", "blend: original, overlay, hist-match, seamless, seamless-hist-match, raw-rgb, raw-predict",
                    choices=BLEND_MODES, group="merge")
    mask_mode: str = opt("learned-prd*learned-dst", "full, dst (landmark hull), learned-prd, learned-dst, their product or sum; "
                         "XSeg-prd, XSeg-dst, their product, or all four multiplied (with --xseg_model)",
                         choices=[*MASK_MODES, *XSEG_MASK_MODES], group="merge")
    xseg_model: str = opt("", "a segmenter from `face xseg train` (.safetensors): needed by the XSeg mask modes; with any "
                          "mode it also reports the frames where something covers the face", path="file", group="merge")
    occlusion_threshold: float = opt(0.15, "with --xseg_model: list the frames where XSeg calls more than this share of "
                                     "a face's landmark area not face (covered)", ge=0, le=1, group="merge")
    erode_mask_modifier: int = opt(0, "erode (>0) or dilate (<0) the mask, in 4x sub-resolution pixels", ge=-400, le=400,
                                   group="merge")
    blur_mask_modifier: int = opt(0, "blur the mask edge, in 4x sub-resolution pixels", ge=0, le=400, group="merge")
    output_face_scale: int = opt(0, "scale the pasted face by this many percent", ge=-50, le=50, group="merge")
    color_transfer_mode: str = opt("rct", "colour transfer of the prediction toward the frame's face: none, rct, lct, mkl, "
                                   "mkl-m, idt, idt-m, sot, sot-m (-m: masked)", choices=SWAP_CT_MODES, group="merge")
    masked_hist_match: bool = opt(True, "hist-match modes: match inside the mask only", group="merge")
    hist_match_threshold: int = opt(238, "hist-match modes: quantile ceiling (255 = plain matching)", ge=0, le=255, group="merge")
    sharpen_mode: str = opt("none", "none, box or gaussian", choices=["none", "box", "gaussian"], group="merge")
    blursharpen_amount: int = opt(0, "sharpen (>0, with sharpen_mode) or blur (<0) the face", ge=-100, le=100, group="merge")
    motion_blur_power: int = opt(0, "motion blur of the face from its frame-to-frame movement", ge=0, le=100, group="merge")
    image_denoise_power: int = opt(0, "median-denoise the frame (0-500)", ge=0, le=500, group="merge")
    bicubic_degrade_power: int = opt(0, "degrade the frame by a bicubic down/up scale (0-100)", ge=0, le=100, group="merge")
    color_degrade_power: int = opt(0, "reduce the output to 256 colours, this much (0-100)", ge=0, le=100, group="merge")
    # ---- labelling (docs/face-swap.md#labelling): the metadata label cannot be turned off
    visible_mark: bool = opt(True, "draw the visible 'AI-generated' mark on every output (--no-visible_mark keeps "
                             "the metadata label)", group="labelling")
    c2pa_cert: str = opt("", "also sign C2PA Content Credentials: your certificate chain (PEM), offline; needs c2pa-python",
                         path="file", group="labelling", advanced=True)
    c2pa_key: str = opt("", "the private key (PEM) of --c2pa_cert", path="file", group="labelling", advanced=True)
    c2pa_alg: str = opt("es256", "signature algorithm of the key", choices=list(C2PA_ALGS), group="labelling", advanced=True)
    quiet: bool = opt(False, "no progress bar")

    @property
    def model_file(self) -> str:
        """The file that makes the faces (--model or --swapper): what the labels and the resume key name."""
        return self.model or self.swapper

    @property
    def output_kind(self) -> str:
        suffix = Path(self.output).suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            return "video"
        return "image" if suffix in IMAGE_OUTPUTS else "frames"

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        if self.end and self.end <= self.start:
            out.append(("end", f"must be after --start ({self.start})"))
        if self.model and Path(self.model).suffix.lower() not in MODEL_SUFFIXES:
            out.append(("model", f"{self.model}: expected a .safetensors face model or an .onnx / .dfm export"))
        if self.model and self.swapper:
            out.append(("swapper", "give --model (a trained face model) or --swapper (an identity-injection swapper), not both"))
        for name in ("swapper", "restore_model"):
            value = getattr(self, name)
            if value and Path(value).suffix.lower() != ".onnx":
                out.append((name, f"{value}: expected an .onnx file" + ("; a DeepFaceLab .dfm or a trained face model goes to "
                                                                       "--model" if name == "swapper" else "")))
        if not self.swapper:
            out += [(name, "only with --swapper") for name in ("source", "restore_model") if getattr(self, name)]
        if self.output_frames and self.output_kind != "video":
            out.append(("output_frames", "only with a video --output (the output itself holds the frames otherwise)"))
        if bool(self.c2pa_cert) != bool(self.c2pa_key):
            out.append(("c2pa_key", "C2PA signing needs both --c2pa_cert and --c2pa_key"))
        if self.c2pa_cert and self.output_kind == "video" and Path(self.output).suffix.lower() not in (".mp4", ".m4v", ".mov"):
            out.append(("c2pa_cert", "C2PA signing of video needs an .mp4 or .mov output"))
        if self.xseg_model and Path(self.xseg_model).suffix.lower() != ".safetensors":
            out.append(("xseg_model", f"{self.xseg_model}: expected a .safetensors segmenter from `face xseg train`"))
        if self.blursharpen_amount > 0 and self.sharpen_mode == "none":
            out.append(("sharpen_mode", "set box or gaussian to sharpen (a positive --blursharpen_amount)"))
        return out + self._reads_clash()

    def _reads_clash(self) -> list[Problem]:
        """An output that is a file the swap reads (a --source photo, a --reference face, a model) or lies inside a
        folder it reads (--source, --dst_faceset): --overwrite replaces earlier outputs, never the person's photos,
        and an output in the --source folder would become a source of the next run. A frames folder that merely
        holds a model or a photo is left alone: writing frames there replaces neither."""
        import os

        from loratrain.core.safe_io import output_conflicts

        reads = [p for p in (self.model, self.swapper, self.recognizer, self.restore_model, self.xseg_model,
                             self.dst_faceset, *self.source, *self.reference) if p]
        out: list[Problem] = []
        for name in ("output", "output_frames"):
            value = getattr(self, name)
            if not value:
                continue
            where = Path(os.path.realpath(os.path.expanduser(value)))
            for inp in reads:
                if where in Path(os.path.realpath(os.path.expanduser(inp))).parents:
                    continue  # the output folder holds the input: not one of the cases above
                out += [(name, m) for m in output_conflicts(value, [inp])]
        return out

    def requirements(self) -> list[Problem]:
        out: list[Problem] = [(name, "is required") for name in ("input", "output") if not getattr(self, name)]
        if not self.model and not self.swapper:
            out.append(("model", "is required (a trained face model; or --swapper with --source and --recognizer)"))
        if self.swapper:
            if not self.source:
                out.append(("source", "--swapper needs the person to put in: --source FACE.png ... or a folder of images"))
            if not self.recognizer:
                out.append(("recognizer", "--swapper needs the recogniser its identity embeddings come from: --recognizer "
                            "an ArcFace-style .onnx (112 px in, 512-d out)"))
            for name in ("swapper", "restore_model"):
                if getattr(self, name) and not Path(getattr(self, name)).is_file():
                    out.append((name, f"file not found: {getattr(self, name)}"))
            out += [("source", f"not found: {s}") for s in self.source if not Path(s).exists()]
            if len(self.source) > 1 and any(Path(s).is_dir() for s in self.source):
                out.append(("source", "one folder, or image files: not a folder among other paths"))
        if self.input and not Path(self.input).exists():
            out.append(("input", f"input not found: {self.input}"))
        if self.model and not Path(self.model).is_file():
            out.append(("model", f"model file not found: {self.model}"))
        if self.mask_mode in XSEG_MASK_MODES and not self.xseg_model:
            out.append(("xseg_model", f"mask mode {self.mask_mode} needs a segmenter: pass --xseg_model (train one with "
                        "`face xseg train`), or choose a mode without XSeg"))
        if self.xseg_model and not Path(self.xseg_model).is_file():
            out.append(("xseg_model", f"xseg model file not found: {self.xseg_model}"))
        if self.dst_faceset and not Path(self.dst_faceset).is_dir():
            out.append(("dst_faceset", f"faceset folder not found: {self.dst_faceset}"))
        for name in ("c2pa_cert", "c2pa_key"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                out.append((name, f"file not found: {getattr(self, name)}"))
        for ref in self.reference:
            if not Path(ref).is_file():
                out.append(("reference", f"face file not found: {ref}"))
        if self.recognizer and not Path(self.recognizer).is_file():
            out.append(("recognizer", f"recogniser file not found: {self.recognizer}"))
        return out
