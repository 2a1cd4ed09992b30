"""Every swap output says it is synthetic (docs/face-swap.md#labelling): a visible corner mark and machine-readable metadata.

Images: PNG text chunks (`AI-generated`, `Software`, `loratrain.model`) plus an XMP packet; JPEG: the same XMP
packet in APP1 and a comment. The XMP uses IPTC's DigitalSourceType "compositeWithTrainedAlgorithmicMedia",
the term news and platform tools read for AI-edited media. Video: the visible mark on every frame and
container tags (comment, description). `--no-visible_mark` drops only the visible mark; nothing drops the metadata.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from loratrain import __version__

MARK_TEXT = "AI-generated"
SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
TOOL = f"loratrain {__version__} face swap"


def statement(model: str) -> str:
    return f"AI-generated: synthetic face swap made with {TOOL}, model {model}"


def xmp_packet(model: str) -> bytes:
    text = statement(model).replace("&", "&amp;").replace("<", "&lt;")
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:loratrain="https://github.com/loratrain/ns/1.0/" '
        f'Iptc4xmpExt:DigitalSourceType="{SOURCE_TYPE}" xmp:CreatorTool="{TOOL}" loratrain:AIGenerated="True" '
        f'loratrain:Model="{Path(model).name}">'
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{text}</rdf:li></rdf:Alt></dc:description>'
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def _layout(shape: tuple[int, ...]) -> tuple[float, int, int, int, tuple[int, int, int, int]]:
    """(font scale, thickness, padding, baseline, box) of the mark on a frame of this shape: text about 3% of
    the frame's smaller side, bottom-right."""
    h, w = shape[:2]
    text_h = max(8, int(round(min(h, w) * 0.03)))
    scale, thick = text_h / 22.0, max(1, text_h // 10)
    (tw, th), base = cv2.getTextSize(MARK_TEXT, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(2, text_h // 4)
    x1, y1 = w - pad, h - pad
    return scale, thick, pad, base, (max(0, x1 - tw - 2 * pad), max(0, y1 - th - base - 2 * pad), x1, y1)


def draw_mark(bgr: np.ndarray) -> np.ndarray:
    """The visible mark, in place: white text on a darkened box."""
    scale, thick, pad, base, (x0, y0, x1, y1) = _layout(bgr.shape)
    box = bgr[y0:y1, x0:x1]
    box[:] = (box.astype(np.float32) * 0.35).astype(bgr.dtype)
    cv2.putText(bgr, MARK_TEXT, (x0 + pad, y1 - pad - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return bgr


def mark_box(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the mark on a frame of this shape (tests and the UI look there)."""
    return _layout(shape)[4]


def save_labelled_image(path: Path, bgr: np.ndarray, model: str, fmt: str, quality: int = 95) -> None:
    """Write a PNG or JPEG with the metadata label (the visible mark is drawn by the caller) to `path` as given
    (callers pass a temp path and rename)."""
    from PIL import Image, PngImagePlugin

    img = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("AI-generated", "true")
        info.add_text("Software", TOOL)
        info.add_itxt("loratrain.model", Path(model).name)
        info.add_itxt("Description", statement(Path(model).name))
        info.add_itxt("XML:com.adobe.xmp", xmp_packet(model).decode("utf-8"))
        img.save(path, format="PNG", pnginfo=info, compress_level=1)
    else:
        img.save(path, format="JPEG", quality=quality, xmp=xmp_packet(model), comment=statement(Path(model).name).encode())


def read_image_label(path: str | Path) -> dict[str, str]:
    """What a reader finds: the text chunks / comment and whether the XMP names the IPTC AI source type."""
    from PIL import Image

    with Image.open(path) as img:
        info = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)) for k, v in img.info.items()
                if isinstance(v, (str, bytes))}
    xmp = info.get("xmp", "") or info.get("XML:com.adobe.xmp", "")
    info["iptc_ai_source"] = str(SOURCE_TYPE in xmp)
    return info


def video_metadata_args(model: str) -> list[str]:
    text = statement(Path(model).name)
    return ["-metadata", f"comment={text}", "-metadata", f"description={text}", "-metadata", f"encoder_tool={TOOL}"]


class C2paSigner:
    """C2PA Content Credentials signed offline with the user's key: a `c2pa.created` action whose
    digitalSourceType is IPTC's compositeWithTrainedAlgorithmicMedia. Built once, before any work, so a
    wrong key or certificate is named up front."""

    MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".mp4": "video/mp4", ".m4v": "video/mp4",
            ".mov": "video/quicktime"}

    def __init__(self, cert: str, key: str, alg: str, model: str) -> None:
        from loratrain.core.errors import ConfigError

        try:
            import c2pa
        except ImportError:
            raise ConfigError("C2PA signing needs c2pa-python: pip install 'loratrain[c2pa]'") from None
        self.c2pa, self.model = c2pa, model
        try:
            info = c2pa.C2paSignerInfo(alg.encode(), Path(cert).read_bytes(), Path(key).read_bytes(), None)
            self.signer = c2pa.Signer.from_info(info)
        except Exception as e:  # c2pa raises its own error types for unreadable keys and certificates
            raise ConfigError(f"c2pa_cert {cert} / c2pa_key {key}: cannot sign with them ({str(e).splitlines()[0][:200]})") from None

    def manifest(self, title: str) -> dict:
        return {"claim_generator_info": [{"name": "loratrain", "version": __version__}], "title": title,
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [{
                    "action": "c2pa.created", "digitalSourceType": SOURCE_TYPE,
                    "softwareAgent": {"name": TOOL}, "description": statement(Path(self.model).name)}]}}]}

    def sign(self, src: Path, dst: Path, suffix: str, title: str) -> None:
        """Sign `src` (a finished file whose type `suffix` names) into `dst`."""
        mime = self.MIME.get(suffix.lower())
        if mime is None:
            raise ValueError(f"C2PA signing of {suffix} files is not supported; use .png, .jpg, .mp4 or .mov")
        with open(src, "rb") as source, open(dst, "w+b") as dest:
            self.c2pa.Builder(self.manifest(title)).sign(self.signer, mime, source, dest)
