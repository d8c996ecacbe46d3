"""TFDS dataset `webvid_local`: WebVid videos + captions from a local download (results
CSV + `<videos_root>/<page_dir>/<videoid>.mp4`), stored like `video_folder` (array_record,
zlib uint8 clips; bad rows skipped and reported in `skipped.json`). See `builder.py`;
CLI: `python -m data_pipelines.webvid`.
"""

from data_pipelines.video_folder.builder import SKIPPED_REPORT, NoUsableVideoError
from data_pipelines.webvid.builder import BAD_ROW, WebVid, WebVidConfig, build

__all__ = ["WebVid", "WebVidConfig", "build", "BAD_ROW", "NoUsableVideoError",
           "SKIPPED_REPORT"]
