"""TFDS dataset `ucf101_local`: UCF-101 from a local copy and its official split lists
(configs split_1..3, splits train/test, ClassLabel in classInd.txt order, class-name
captions), stored like `video_folder` (array_record, zlib uint8 clips; missing or bad
videos skipped and reported in `skipped.json`). See `builder.py`; CLI:
`python -m data_pipelines.ucf101`.
"""

from data_pipelines.ucf101.builder import SplitConfig, Ucf101, Ucf101Config, build
from data_pipelines.ucf101.sources import class_caption, read_class_index
from data_pipelines.video_folder.builder import SKIPPED_REPORT, NoUsableVideoError

__all__ = ["Ucf101", "Ucf101Config", "SplitConfig", "build", "class_caption",
           "read_class_index", "NoUsableVideoError", "SKIPPED_REPORT"]
