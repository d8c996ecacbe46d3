"""Reading UCF-101's official split lists (no TFDS in here).

The lists come in `ucfTrainTestlist/` (from UCF101TrainTestSplits-RecognitionTask.zip):
  classInd.txt        "1 ApplyEyeMakeup" ... "101 YoYo": the label order
  trainlist0N.txt     "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1" (1-based label)
  testlist0N.txt      "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi" (no label)
with N = 1, 2, 3 and Windows line endings. A list that contradicts classInd.txt (an
unknown class folder, a label that is not its folder's) raises naming the file and line:
the lists are the dataset's definition, so guessing would give wrong labels. A listed
video that is not on disk is only a `Skip`.
"""

import dataclasses
import os
import re

from data_pipelines.video_folder import sources

__all__ = ["ListEntry", "DUPLICATE_ENTRY", "read_class_index", "read_split_list",
           "class_caption", "FileFinder"]

DUPLICATE_ENTRY = "duplicate_entry"  # skip reason: a video listed twice in one list


@dataclasses.dataclass(frozen=True)
class ListEntry:
  """One listed video: `rel` as written in the list (class folder / file name),
  `label` the 0-based index into classInd.txt, `line` the 1-based line number."""
  rel: str
  label: int
  line: int


def _lines(path: str, what: str):
  """(line number, stripped text) of the non-blank lines of `path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: UCF-101 {what} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  out = []
  # Lines end at CRLF (the official lists), LF or CR; decoded one by one so that an
  # error names its line (utf-8-sig: a byte-order mark).
  for n, raw in enumerate(data.splitlines(), 1):
    try:
      line = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}:{n}: UCF-101 {what} is not valid UTF-8 text "
                       f"({e.reason} in the line's text)") from None
    if line:
      out.append((n, line))
  return out


def read_class_index(path: str) -> list[str]:
  """The class names of classInd.txt, in file order (label i = line "i+1 Name")."""
  names = []
  for n, line in _lines(path, "class index (classInd.txt)"):
    parts = line.split()
    if len(parts) != 2 or not parts[0].isdigit():
      raise ValueError(f"{path}:{n}: expected '<index> <ClassName>', got {line!r}")
    # The labels in trainlist files are these indices; only a 1, 2, 3, ... sequence
    # makes "label = index - 1" and "label = position in the file" the same thing.
    if int(parts[0]) != len(names) + 1:
      raise ValueError(f"{path}:{n}: class index {parts[0]} out of order; expected "
                       f"{len(names) + 1} (indices must count 1, 2, 3, ... in file order)")
    if parts[1] in names:
      raise ValueError(f"{path}:{n}: class {parts[1]!r} is listed twice")
    names.append(parts[1])
  if not names:
    raise ValueError(f"{path}: lists no classes")
  return names


def read_split_list(path: str, class_names: list[str],
                    class_index_path: str = "classInd.txt"
                    ) -> tuple[list[ListEntry], list[sources.Skip]]:
  """The entries of a train/test list, in file order, plus `Skip`s for repeated
  entries (the first one wins). The class is the entry's folder; a label column, when
  present (train lists), must agree with it."""
  index = {name: i for i, name in enumerate(class_names)}
  # Folder names are matched ignoring case as a fallback: the official files are not
  # always consistent in case (e.g. "HandStandPushups" vs "HandstandPushups").
  lower = {name.lower(): i for i, name in enumerate(class_names)}
  entries, skips, seen = [], [], {}
  list_name = os.path.basename(path)
  for n, line in _lines(path, "split list"):
    parts = line.split()
    rel = parts[0].replace("\\", "/")
    if len(parts) > 2 or rel.count("/") != 1:
      raise ValueError(f"{path}:{n}: expected '<ClassName>/<file>.avi [label]', "
                       f"got {line!r}")
    folder = rel.split("/")[0]
    label = index.get(folder, lower.get(folder.lower()))
    if label is None:
      raise ValueError(f"{path}:{n}: class folder {folder!r} is not in "
                       f"{class_index_path}")
    if len(parts) == 2:
      if not parts[1].isdigit():
        raise ValueError(f"{path}:{n}: label column must be an integer, got {parts[1]!r}")
      if int(parts[1]) != label + 1:
        raise ValueError(f"{path}:{n}: label {parts[1]} disagrees with class folder "
                         f"{folder!r}, which is {label + 1} in {class_index_path}")
    if rel in seen:
      skips.append(sources.Skip(rel, DUPLICATE_ENTRY, f"{list_name} line {n} repeats "
                                f"line {seen[rel]}; first kept"))
      continue
    seen[rel] = n
    entries.append(ListEntry(rel, label, n))
  return entries, skips


_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def class_caption(name: str) -> str:
  """A readable caption for a CamelCase class name: "ApplyEyeMakeup" -> "apply eye
  makeup", "YoYo" -> "yo yo" (an all-caps run such as "TV" stays one word)."""
  words = _WORD.findall(name)
  return " ".join(w.lower() for w in words) if words else name


class FileFinder:
  """Finds listed files under the videos folder: exactly, or else ignoring case (some
  list entries differ in case from the files of some UCF-101 copies, and a
  case-sensitive file system would otherwise report them missing). The case-blind
  index is built on the first miss only, with one walk of the folder."""

  def __init__(self, root: str):
    self.root = root
    self._lower = None  # lower-case relative path -> relative path on disk

  def find(self, rel: str) -> str | None:
    """`rel` as it is on disk (relative, '/' separators), or None if not there."""
    if os.path.isfile(os.path.join(self.root, *rel.split("/"))):
      return rel
    if self._lower is None:
      self._lower = {}
      for folder, dirs, files in os.walk(self.root):
        dirs.sort()
        for name in sorted(files):
          on_disk = os.path.relpath(os.path.join(folder, name), self.root)
          on_disk = on_disk.replace(os.sep, "/")
          self._lower.setdefault(on_disk.lower(), on_disk)
    return self._lower.get(rel.lower())
