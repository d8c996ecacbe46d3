"""The on-disk format of a converted image LDM (what `videoldm-convert` writes).

  DIR/model_index.json  format tag, model configs (unet, vae, text_encoder), the
                        diffusers-style scheduler config, where it came from, and for
                        a trained export what it was trained on (`training`)
  DIR/params/           Orbax checkpoint of {'unet', 'vae'[, 'text_encoder']} param trees
  DIR/tokenizer/        the CLIP tokenizer files (vocab.json + merges.txt or
                        tokenizer.json, special_tokens_map.json, tokenizer_config.json)

JSON and Orbax only: nothing here unpickles anything.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from videoldm_jax.config_files import read_json_object
from videoldm_jax.diffusion import schedules
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, check_tokenizer
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.tokenizer import CLIPTokenizer
from videoldm_jax.models.unet import UNetConfig
from videoldm_jax.models.vae import VAEConfig, VAETemporalConfig

FORMAT = "videoldm-jax/image-ldm"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json",
                   "tokenizer_config.json", "added_tokens.json")
# Scheduler fields kept from a diffusers scheduler_config.json: the noise schedule and
# how the model's output is read (`schedules.schedule_from_diffusers_config` checks
# them on save), and the keys of other noise processes (EDM, flow matching), kept so
# that the check refuses them rather than a save dropping them. The rest (solver order,
# Karras sigmas, ...) is sampler choice, which belongs to the sampling command.
SCHEDULER_FIELDS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                    "prediction_type", "steps_offset", "timestep_spacing",
                    "set_alpha_to_one", "clip_sample", "clip_sample_range",
                    "rescale_betas_zero_snr", "trained_betas", "thresholding",
                    "variance_type", "sigma_data", "shift", "use_dynamic_shifting",
                    "timestep_type")


@dataclasses.dataclass
class PretrainedLDM:
  """Configs and param trees of a text- or class-conditional image (or video) LDM."""
  unet_config: UNetConfig
  vae_config: VAEConfig
  text_config: Optional[CLIPTextConfig]
  scheduler: dict[str, Any]
  params: dict[str, Any]  # {'unet', 'vae'[, 'text_encoder']}
  source: str = ""
  # Set for a video LDM (an exported training result): params['unet'] then holds the
  # temporal layers too.
  temporal_config: Optional[TemporalConfig] = None
  # Set when params['vae'] holds a video decoder (the decoder stage's export): its
  # temporal layers (`temporal_*` leaves under vae/decoder). Absent from older folders.
  vae_temporal_config: Optional[VAETemporalConfig] = None
  # What a trainer export was trained on (`training_record`); {} for converted models
  # and older folders. videoldm-generate checks its options against it.
  training: dict[str, Any] = dataclasses.field(default_factory=dict)
  # The same for params['vae'] when an autoencoder or decoder stage trained it: kept
  # apart from `training`, which stays the UNet's (a decoder stage built on a key-frame
  # export holds both models).
  decoder_training: dict[str, Any] = dataclasses.field(default_factory=dict)


def write_folder(out: Path, write: Callable[[Path], object]) -> None:
  """`write(folder)` into a hidden sibling of `out`, renamed to `out` once it returns:
  a run killed mid-write leaves no `out` that looks complete. A leftover sibling is
  replaced; `out` may exist if empty."""
  out = Path(out)
  tmp = out.with_name(f".{out.name}.partial")
  if tmp.is_symlink() or tmp.is_file():  # (rmtree refuses both)
    tmp.unlink()
  elif tmp.exists():
    shutil.rmtree(tmp)
  try:
    write(tmp)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def check_new_folder(out_dir: str | Path) -> Path:
  """`out_dir`, absolute, where a model may be written: absent or an empty folder.
  Entry points call it before their slow work, the savers again before writing."""
  out_dir = Path(out_dir).absolute()
  if out_dir.is_symlink():
    # The final rename (`write_folder`) cannot replace a link: the model, written,
    # would be lost at the last moment.
    raise FileExistsError(f"{out_dir}: is a symbolic link (to {os.readlink(out_dir)}); "
                          "give the folder itself, or a new path")
  if out_dir.exists() and not out_dir.is_dir():
    raise FileExistsError(f"{out_dir}: exists and is not a folder; choose a new output "
                          "folder")
  if out_dir.exists() and any(out_dir.iterdir()):
    raise FileExistsError(f"{out_dir}: exists and is not empty; choose a new output folder")
  return out_dir


def save(out_dir: str | Path, model: PretrainedLDM, tokenizer_dir: str | Path | None = None
         ) -> Path:
  """Writes `model` to `out_dir` (created; an existing non-empty folder is an error).

  Everything is checked before anything is written (the tokenizer folder loads, the
  scheduler config is one this package samples with), and the folder appears only
  complete (`write_folder`).
  """
  out_dir = check_new_folder(out_dir)
  if tokenizer_dir is not None:
    tokenizer = CLIPTokenizer.from_folder(str(tokenizer_dir))
    if model.text_config is not None:
      check_tokenizer(tokenizer, model.text_config, str(tokenizer_dir))
  # (NumPy scalars as the Python numbers JSON can write: json.dumps refused a float32)
  scheduler = {k: v.item() if isinstance(v, np.generic) else v
               for k, v in model.scheduler.items() if k in SCHEDULER_FIELDS}
  try:
    schedules.schedule_from_diffusers_config(scheduler)
  except ValueError as e:
    raise ValueError(f"{model.source or 'model'}: {e}") from e
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  write_folder(out_dir, lambda tmp: _write(tmp, model, scheduler, tokenizer_dir))
  return out_dir


def _write(out_dir: Path, model: PretrainedLDM, scheduler: dict,
           tokenizer_dir: str | Path | None) -> None:
  out_dir.mkdir()
  index = {
      "format": FORMAT, "format_version": FORMAT_VERSION, "source": model.source,
      "unet": model.unet_config.to_dict(), "vae": model.vae_config.to_dict(),
      "text_encoder": None if model.text_config is None else model.text_config.to_dict(),
      "scheduler": scheduler,
      "temporal": (None if model.temporal_config is None
                   else model.temporal_config.to_dict()),
  }
  if model.vae_temporal_config is not None:  # only then: older readers see no new key
    index["vae_temporal"] = model.vae_temporal_config.to_dict()
  if model.training:
    index["training"] = model.training
  if model.decoder_training:
    index["decoder_training"] = model.decoder_training
  (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
  write_params(out_dir / "params", model.params)
  if tokenizer_dir is not None:
    copy_tokenizer(tokenizer_dir, out_dir / "tokenizer")


def _this_process_only() -> ocp.StandardCheckpointer:
  """An Orbax checkpointer for files this process reads or writes alone (a model folder:
  exports are written by process 0 only). Orbax's default synchronises every process
  of a multi-process run around a save: process 0 waited there for processes that
  were waiting for it, and a multi-process run hung at its export."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


def write_params(path: Path, params: dict) -> None:
  """The param tree (host copies) as an Orbax checkpoint at `path`, by this process."""
  with _this_process_only() as checkpointer:
    checkpointer.save(path, jax.tree_util.tree_map(np.asarray, params))
    checkpointer.wait_until_finished()


def read_params(path: Path) -> dict:
  """The param tree written by `write_params` (host NumPy arrays). FileNotFoundError
  for a missing checkpoint, ValueError naming `path` for a truncated or damaged one."""
  if not Path(path).is_dir():
    raise FileNotFoundError(f"{path}: missing (the model folder's weights, an Orbax "
                            "checkpoint)")
  try:
    with _this_process_only() as checkpointer:
      return checkpointer.restore(path)
  except Exception as e:  # (Orbax / TensorStore raise many kinds; none names the folder)
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(f"{path}: unreadable or incomplete Orbax checkpoint of the model's "
                     f"weights ({type(e).__name__}: {reason[:300]})") from e


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
  """Copies the known tokenizer files of `src` into `dst`."""
  src, dst = Path(src), Path(dst)
  found = [f for f in TOKENIZER_FILES if (src / f).is_file()]
  if not found:
    raise FileNotFoundError(f"{src}: no tokenizer files (expected some of {TOKENIZER_FILES})")
  dst.mkdir(parents=True, exist_ok=True)
  for f in found:
    shutil.copyfile(src / f, dst / f)


def load_index(model_dir: str | Path) -> dict[str, Any]:
  """Reads and checks `model_index.json` of a converted model folder."""
  path = Path(model_dir) / "model_index.json"
  if not path.is_file():
    if (Path(model_dir) / "upsampler_index.json").is_file():
      raise FileNotFoundError(f"{model_dir}: an upsampler export (upsampler_index.json), "
                              "not a latent diffusion model; pass it to videoldm-generate "
                              "as --upsampler_model")
    raise FileNotFoundError(f"{path}: missing; {model_dir} is not a converted videoldm-jax "
                            "model (make one with videoldm-convert)")
  index = read_index(path, FORMAT, FORMAT_VERSION)
  missing = [k for k in ("unet", "vae", "scheduler") if not isinstance(index.get(k), dict)]
  if missing:
    raise ValueError(f"{path}: no {missing} entries (JSON objects); the folder is "
                     "incomplete or was not written by videoldm-jax")
  for key in ("text_encoder", "temporal", "vae_temporal", "training", "decoder_training"):
    if index.get(key) is not None and not isinstance(index[key], dict):
      # (a string was read as a list of field names: "unknown fields ['c', 'l', ...]")
      raise ValueError(f"{path}: {key!r} must be a JSON object or null, got "
                       f"{type(index[key]).__name__} {index[key]!r}")
  return index


def read_index(path: Path, fmt: str, version: int) -> dict[str, Any]:
  """The JSON object of a model folder's index file `path`, checked to be of format
  `fmt` and a format_version no newer than `version`; what is wrong is named."""
  index = read_json_object(path)
  if index.get("format") is None and "_diffusers_version" in index:
    # (A diffusers pipeline's own model_index.json: "format None" told no one what to do.)
    raise ValueError(f"{path}: a diffusers pipeline folder ({index.get('_class_name')}), "
                     "not a videoldm-jax model folder; convert it first: videoldm-convert "
                     f"--diffusers={path.parent} --output=NEW_FOLDER")
  if index.get("format") != fmt:
    raise ValueError(f"{path}: format {index.get('format')!r}, expected {fmt!r}")
  saved = index.get("format_version", 0)
  if not isinstance(saved, int) or isinstance(saved, bool) or saved < 0:
    raise ValueError(f"{path}: format_version {saved!r}, expected a whole number")
  if saved > version:
    raise ValueError(f"{path}: format_version {saved} is newer than this videoldm-jax "
                     f"understands ({version}); upgrade the package")
  return index


def load(model_dir: str | Path, weights: bool = True) -> PretrainedLDM:
  """Reads a converted model folder (params as host numpy arrays). weights=False reads
  its configs and training records alone (params {}): a command's refusals of the
  wrong kind of model then come before gigabytes of weights are read."""
  model_dir = Path(model_dir).absolute()
  index = load_index(model_dir)
  source = str(model_dir / "model_index.json")
  text, temporal = index.get("text_encoder"), index.get("temporal")
  vae_temporal = index.get("vae_temporal")
  training = index.get("training") or {}
  decoder_training = index.get("decoder_training") or {}
  if not decoder_training and training.get("stage") in _AUTOENCODER_STAGES:
    # Older autoencoder / decoder exports wrote their record as the UNet's.
    training, decoder_training = {}, training
  configs = dict(  # (checked before the weights are read)
      unet_config=UNetConfig.from_dict(index["unet"], source),
      vae_config=VAEConfig.from_dict(index["vae"], source),
      text_config=None if text is None else CLIPTextConfig.from_dict(text, source),
      temporal_config=None if temporal is None else TemporalConfig.from_dict(temporal, source),
      vae_temporal_config=(None if vae_temporal is None
                           else VAETemporalConfig.from_dict(vae_temporal, source)))
  return PretrainedLDM(**configs, scheduler=index["scheduler"],
                       params=read_params(model_dir / "params") if weights else {},
                       source=index.get("source", ""), training=training,
                       decoder_training=decoder_training)


# Stages that train params['vae'] (their record is `decoder_training`).
_AUTOENCODER_STAGES = ("decoder", "autoencoder")


def training_record(config) -> dict[str, Any]:
  """What a stage's export records of its training (a trainer config -> JSON-able dict):
  stage, clip length and size, the interpolation stride / largest context count of the
  interpolator / predictor stages, and their `no_context_prob`: how often a clip
  trained without context (the branch context guidance subtracts)."""
  d = config.data
  record = {"stage": config.stage, "num_frames": int(d.num_frames),
            "frame_stride": int(d.get("frame_stride", 1)), "height": int(d.height),
            "width": int(d.width)}
  if "interpolator" in config:
    record["interp_stride"] = int(config.interpolator.stride)
    record["no_context_prob"] = float(config.interpolator.get("context_drop_prob", 0.0))
  if "predictor" in config:
    from videoldm_jax.stages.predictor import max_context  # (the stages import this module)
    probs = [float(p) for p in config.predictor.num_context_probs]
    record["max_context"] = max_context(probs)
    record["no_context_prob"] = probs[0] / sum(probs)
  return record


def load_with_tokenizer(model_dir: str | Path) -> tuple[PretrainedLDM, Optional[CLIPTokenizer]]:
  """`load` plus the folder's tokenizer (None for models without a text encoder)."""
  model = load(model_dir)
  tokenizer = None
  if model.text_config is not None:
    tokenizer = CLIPTokenizer.from_folder(str(Path(model_dir) / "tokenizer"))
    check_tokenizer(tokenizer, model.text_config, str(model_dir))
  return model, tokenizer


def random_image_ldm(config, path: str = "config") -> PretrainedLDM:
  """Builds an `PretrainedLDM` with random params from a config like configs/image_tiny.py.
  path: where that config sits in the user's config, for errors (`config` for
  configs/image_tiny.py, `config.random_image_model` in a stage config): a wrong value
  is named as its --config flag writes it (config.random_image_model.unet.x=...). All
  three model configs are checked before any parameter is initialised."""
  unet_cfg = UNetConfig.from_config(config.unet, f"{path}.unet").validate()
  vae_cfg = VAEConfig.from_config(config.vae, f"{path}.vae")
  text_cfg = None
  if config.get("text_encoder") is not None:
    text_cfg = CLIPTextConfig.from_config(config.text_encoder, f"{path}.text_encoder")
  params = {
      "unet": params_lib.init_params(
          unet_lib.UNet(unet_cfg), config.seed,
          *unet_lib.example_inputs(unet_cfg, text=unet_lib.called_with_context(
              unet_cfg, config.get("text_encoder") is not None))),
      "vae": params_lib.init_params(vae_lib.AutoencoderKL(vae_cfg), config.seed,
                                    *vae_lib.example_inputs(vae_cfg)),
  }
  if text_cfg is not None:
    ids = jnp.zeros((1, text_cfg.max_position_embeddings), jnp.int32)
    params["text_encoder"] = params_lib.init_params(CLIPTextModel(text_cfg), config.seed,
                                                    ids)
  return PretrainedLDM(unet_cfg, vae_cfg, text_cfg, dict(config.scheduler), params,
                  source="random init")
