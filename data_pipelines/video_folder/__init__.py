"""TFDS dataset `video_folder`: a folder tree of videos (+ optional captions) stored as
array_record with zlib-compressed uint8 (T, H, W, 3) clips; bad files are skipped and
reported in `skipped.json`. See `builder.py`; CLI: `python -m data_pipelines.video_folder`.
"""

from data_pipelines.video_folder.builder import (SKIPPED_REPORT, NoUsableVideoError,
                                                 VideoFolder, VideoFolderConfig, build)
from data_pipelines.video_folder.sources import VIDEO_EXTENSIONS

__all__ = ["VideoFolder", "VideoFolderConfig", "NoUsableVideoError", "build",
           "SKIPPED_REPORT", "VIDEO_EXTENSIONS"]
