"""An ffmpeg executable for Gradio's streamed audio (it encodes spoken replies with it).

The system's ffmpeg is used when there is one; otherwise the one inside the imageio-ffmpeg
wheel (installed with the app, so nothing is fetched at run time) is linked under ``folder``
as ``ffmpeg`` and put first on this process's PATH.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def ensure_ffmpeg(folder: Path) -> str | None:
    """The ffmpeg this process will use, or None (spoken replies then say so)."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        bundled = Path(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError) as error:
        log.warning("no ffmpeg: spoken replies cannot be streamed (%s); install ffmpeg", error)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "ffmpeg"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(bundled)
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
    return str(link)
