"""The `extension_mismatch` check: a file whose content is another format than its extension says.

Our trainer and the tagger open images with Pillow, which reads the content and ignores
the name, so a PNG named `.jpg` still trains: a warning, not an error. It is worth saying because
other tools go by the name (upload forms, viewers, scripts that re-save by extension, the `.png`
means lossless guess when choosing which duplicate to keep), and a "PNG" that is really a JPEG
carries JPEG artefacts. The fix is a rename (the caption `<stem>.txt` keeps its name, so nothing
else changes); it is only suggested, never done, as a rename can collide with another image's name.
"""
from __future__ import annotations

from .checks import CHECKS, Dataset, Finding

#: Pillow's format names per extension; MPO is the JPEG variant many cameras write (a JPEG with a second frame)
FORMATS = {".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".png": {"PNG"}, ".webp": {"WEBP"}, ".bmp": {"BMP"}}
#: the extension to rename to, per content format
EXTENSION_OF = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif",
                "TIFF": ".tif"}


@CHECKS.register("extension_mismatch")
def extension_mismatch(ds: Dataset) -> list[Finding]:
    out = []
    for info in ds.readable():
        ext = info.path.suffix.lower()
        expected = FORMATS.get(ext)
        if not expected or not info.format or info.format in expected:
            continue
        right = EXTENSION_OF.get(info.format, "")
        target = info.path.with_suffix(right) if right else None
        if target is None:
            fix = f"re-save it as {ext[1:].upper()}"
        elif target.exists():
            fix = f"re-save it as {ext[1:].upper()} ({target.name} already exists, so no rename)"
        else:
            fix = f"rename it to {target.name} (its caption keeps its name) or re-save it as {ext[1:].upper()}"
        out.append(Finding("extension_mismatch", str(info.path), "warning",
                           f"content is {info.format} but the name says {ext}: our trainer and tagger read it anyway "
                           f"(Pillow goes by content), other tools go by the name; {fix}"))
    return out
