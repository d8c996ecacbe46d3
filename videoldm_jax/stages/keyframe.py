"""Key-frame stage (Video LDM eq. 2): train the temporal layers phi of the video UNet on
video latents, theta (the image UNet), the VAE and the text encoder frozen.

A batch is a dict of global arrays:
  video   uint8 (B, T, H, W, 3), encoded here by the frozen VAE (a posterior sample), or
  latents float (B, T, h, w, C), already scaled (a latent cache);
  tokens  int32 (B, L) CLIP token ids of the captions (text-conditioned models), or
  context float (B, L, D) their text embeddings (a latent cache);
  frame_tokens int32 (B, T, L), with data.image_fraction > 0: each frame's caption,
          used instead of tokens (an image example's frames come from different clips);
  labels  int32 (B,) class labels (class-conditional UNets);
  image_only bool (B, T), optional: frames that are still images (alpha = 1).
One diffusion time tau per video, shared by its frames; with probability
`cond_drop_prob` a video's caption is replaced by the empty prompt and its class label
by the model's null class (`null_class_label`, where it has one), both by one draw:
the unconditional branch of classifier-free guidance has neither.
"""

import dataclasses
import sys
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from videoldm_jax import distributed, pretrained
from videoldm_jax.data import inputs, latent_cache
from videoldm_jax.diffusion.losses import denoising_loss
from videoldm_jax.diffusion.schedules import schedule_from_diffusers_config
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import partition
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, check_tokenizer
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.tokenizer import CLIPTokenizer, write_byte_level_tokenizer
from videoldm_jax.models.unet import UNetConfig, called_with_context
from videoldm_jax.models.vae import AutoencoderKL, VAEConfig, VAETemporalConfig
from videoldm_jax.pipelines import sampling
from videoldm_jax.stages import base
from videoldm_jax.stages.base import StageSetup, init_where
from videoldm_jax.train.state import merge
from videoldm_jax.train import optim
from videoldm_jax.train.step import Stage
from videoldm_jax.video_ldm import VideoLDM


def encode_video(vae: AutoencoderKL, vae_params: dict, video_u8: jax.Array,
                 key: Optional[jax.Array]) -> jax.Array:
  """uint8 (B, T, H, W, 3) -> scaled latents (B, T, h, w, C), frame by frame."""
  b, t = video_u8.shape[:2]
  x = video_u8.reshape((b * t,) + video_u8.shape[2:]).astype(jnp.float32) / 127.5 - 1.0
  z = vae.apply({"params": vae_params}, x, key, method=AutoencoderKL.encode_latents)
  return z.reshape((b, t) + z.shape[1:])


def takes_context(ldm) -> bool:
  """Whether the stage's UNet is called with a context (`unet.called_with_context`)."""
  return called_with_context(ldm.unet_config, ldm.text_config is not None)


def text_context(text: Optional[CLIPTextModel], params: dict, batch: dict,
                 uncond_tokens: Optional[np.ndarray], drop_prob: float, key: jax.Array,
                 dtype, takes: bool = True) -> Optional[jax.Array]:
  """Cross-attention context (B, L, D) of a batch, (B*T, L, D) from per-frame
  `frame_tokens` (B, T, L), or None.

  With a text encoder: caption embeddings from `frame_tokens`, `tokens` or a cached
  `context`, each video's replaced by the empty prompt's with probability drop_prob
  (classifier-free guidance needs it). Without one, a `context` in the batch is used as
  given (embeddings computed outside the model, e.g. a latent cache of another encoder;
  no dropping, since no empty-prompt embedding is known) when the UNet takes one
  (`takes`, False for a class-conditional model: `unet.called_with_context`); otherwise
  None.
  """
  if text is None:
    # `takes` False: a class-conditional model without a text encoder, whose attn2
    # attends to its own tokens; a cache's text embeddings are not for it.
    return None if "context" not in batch or not takes else batch["context"].astype(dtype)
  frames = 1
  if "context" in batch:
    context = batch["context"].astype(dtype)
  elif "frame_tokens" in batch:
    # Per frame (B*T, L, D): an image example's frames come from different clips.
    tokens = batch["frame_tokens"]
    frames = tokens.shape[1]
    context = text.apply({"params": params["text_encoder"]},
                         tokens.reshape((-1,) + tokens.shape[2:]))
  else:
    context = text.apply({"params": params["text_encoder"]}, batch["tokens"])
  empty = text.apply({"params": params["text_encoder"]}, jnp.asarray(uncond_tokens)[None])
  # One draw per video, shared by its frames: a video's frames keep one condition.
  drop = jnp.repeat(_dropped(key, drop_prob, context.shape[0] // frames), frames)
  return jnp.where(drop[:, None, None], empty.astype(context.dtype), context)


def _dropped(key: jax.Array, drop_prob: float, videos: int) -> jax.Array:
  """(videos,) bool: the videos whose condition is dropped. `text_context` and
  `drop_labels` draw the same with the same key, so a text- and class-conditional
  video loses both together."""
  return jax.random.bernoulli(key, drop_prob, (videos,))


def drop_labels(labels: Optional[jax.Array], null_label: Optional[int], drop_prob: float,
                key: jax.Array, videos: int) -> Optional[jax.Array]:
  """Class labels (B,) or per frame (B*T,) with each of the `videos` videos' replaced by
  `null_label` with probability drop_prob (the draws of `text_context` with the same
  key). No labels or no null class: unchanged."""
  if labels is None or null_label is None:
    return labels
  drop = jnp.repeat(_dropped(key, drop_prob, videos), labels.shape[0] // videos)
  return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


@dataclasses.dataclass(frozen=True)
class KeyframeOptions:
  mode: str = "temporal"          # "temporal": phi only; "full": the whole UNet
  cond_drop_prob: float = 0.1
  min_snr_gamma: Optional[float] = None
  # The class label of the unconditional branch (`null_class_label`); None: labels are
  # never dropped.
  null_class_label: Optional[int] = None

  def __post_init__(self):
    # (Out of range, they trained silently: p > 1 drops every caption, gamma = 0 zeroes
    # the loss, a negative gamma climbs it.)
    if not 0.0 <= self.cond_drop_prob <= 1.0:
      raise ValueError(f"config.cond_drop_prob={self.cond_drop_prob}: expected a "
                       "probability in [0, 1]")
    if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
      raise ValueError(f"config.min_snr_gamma={self.min_snr_gamma}: expected > 0, or None "
                       "for no Min-SNR weighting")


def is_trainable_fn(mode: str):
  if mode not in ("temporal", "full"):
    raise ValueError(f"mode must be 'temporal' or 'full', got {mode!r}")
  if mode == "temporal":
    return lambda path: path[0] == "unet" and partition.is_temporal(path)
  return lambda path: path[0] == "unet"


def make_stage(ldm: VideoLDM, options: KeyframeOptions,
               uncond_tokens: Optional[np.ndarray]) -> Stage:
  """The key-frame stage for `ldm`; `uncond_tokens` (L,) are the empty prompt's ids."""
  unet, vae = ldm.unet(), ldm.vae()
  text = None if ldm.text_config is None else CLIPTextModel(ldm.text_config,
                                                            dtype=ldm.compute_dtype)
  schedule, sampling = schedule_from_diffusers_config(ldm.scheduler)

  def loss_fn(params, batch, key, step=None):
    k_vae, k_drop, k_diff = jax.random.split(key, 3)
    if "latents" in batch:
      latents = batch["latents"].astype(jnp.float32)
    else:
      latents = encode_video(vae, params["vae"], batch["video"], k_vae)
    context = text_context(text, params, batch, uncond_tokens, options.cond_drop_prob,
                           k_drop, ldm.compute_dtype, takes_context(ldm))
    labels = drop_labels(batch_labels(batch), options.null_class_label,
                         options.cond_drop_prob, k_drop, latents.shape[0])
    image_only = batch.get("image_only")

    def model_fn(x_t, t):
      return unet.apply({"params": params["unet"]}, x_t, t, context, labels, image_only)

    per_video = denoising_loss(model_fn, latents, k_diff, schedule, sampling.prediction_type,
                               options.min_snr_gamma)
    loss = jnp.mean(per_video)
    return loss, {"denoise_loss": loss}

  return Stage("keyframe", is_trainable_fn(options.mode), loss_fn)


# ---------------------------------------------------------------------------------------
# The trainer's view (stages/base.py): shared by every stage built on the video UNet.

def options_from_config(config: ml_collections.ConfigDict,
                        null_class_label: Optional[int] = None) -> KeyframeOptions:
  """The stage options of `config`; null_class_label: `null_class_label(config, image)`."""
  return KeyframeOptions(mode=config.mode, cond_drop_prob=config.cond_drop_prob,
                         min_snr_gamma=config.get("min_snr_gamma"),
                         null_class_label=null_class_label)


def null_class_label(config: ml_collections.ConfigDict,
                     image: pretrained.PretrainedLDM) -> Optional[int]:
  """The class label a class-conditional UNet's unconditional branch uses: the one
  the image model was trained with (its export's record), or config.null_class_label
  for an image model that has none, whose class table then needs a row no data label
  uses, which cond_drop_prob > 0 trains. None: labels are never dropped and
  class-conditional samples are unguided."""
  given, recorded = config.get("null_class_label"), image.training.get("null_class_label")
  source = image_model_source(config)
  classes = image.unet_config.num_class_embeds
  if recorded is not None and not (classes and isinstance(recorded, int)
                                   and 0 <= recorded < classes):
    raise ValueError(f"{source}: its training record's null_class_label={recorded!r} is "
                     f"not one of the UNet's classes (unet.num_class_embeds={classes})")
  if given is None:
    return recorded
  if isinstance(given, bool) or not isinstance(given, (int, np.integer)):
    raise ValueError(f"config.null_class_label={given!r}: expected a class index, or None "
                     "for no label dropout")
  if not classes:
    raise ValueError(f"config.null_class_label={given}: {source} is not class-conditional "
                     "(unet.num_class_embeds is unset)")
  if not 0 <= given < classes:
    raise ValueError(f"config.null_class_label={given}: expected one of the UNet's classes "
                     f"0..{classes - 1} (unet.num_class_embeds={classes}), a row no data "
                     "label uses")
  if recorded is not None:
    if given != recorded:
      raise ValueError(f"config.null_class_label={given}: {source} was trained with null "
                       f"class {recorded}; leave config.null_class_label unset to use it")
    return recorded
  if config.image_model and config.mode != "full":
    # The frozen class table keeps the label's trained meaning: the unconditional
    # branch would be that class.
    raise ValueError(f"config.null_class_label={given}: {source} was trained without a "
                     f"null class, and its class embedding is frozen (mode={config.mode!r}); "
                     "train the image model with it (the image_ldm stage), or set "
                     "config.mode='full'")
  if not config.cond_drop_prob > 0:
    # No label ever drops to it: its row keeps its initial values, and guidance would
    # push every sample away from an untrained embedding.
    raise ValueError(f"config.null_class_label={given} with config.cond_drop_prob="
                     f"{config.cond_drop_prob}: no label is ever dropped to the null class, "
                     "so its row never trains; set config.cond_drop_prob > 0 (e.g. 0.1), "
                     "or leave config.null_class_label unset")
  return int(given)


# Where the random image model's sections sit in a stage config (for errors).
RANDOM_IMAGE_MODEL = "config.random_image_model"


def image_model_source(config: ml_collections.ConfigDict, section: str = "") -> str:
  """What errors name as the image model: the config.image_model folder or preset, else
  the random model's config section (`section`, e.g. "text_encoder", below it)."""
  if config.get("image_model"):
    return config.image_model
  return f"{RANDOM_IMAGE_MODEL}.{section}" if section else RANDOM_IMAGE_MODEL


def _random_image_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.random_image_model, which the *_base configs leave empty (they fine-tune a
  real image model)."""
  r = config.get("random_image_model") or ml_collections.ConfigDict()
  missing = [k for k in ("unet", "vae", "scheduler") if k not in r]
  if missing:
    raise ValueError(f"config.image_model is empty and {RANDOM_IMAGE_MODEL} has no "
                     f"{'/'.join(missing)}: set --config.image_model to a videoldm-convert "
                     "folder (or a stage export), or start from a *_tiny config for a "
                     "random model")
  return r


def load_image_model(config: ml_collections.ConfigDict, workdir: Path, sync: bool = True,
                     keep_video_decoder: bool = False
                     ) -> tuple[pretrained.PretrainedLDM, Optional[CLIPTokenizer], Path]:
  """(model, tokenizer, tokenizer folder) from `config.image_model` (a converted or
  exported folder) or, when empty, a random model from `config.random_image_model`
  with a byte-level tokenizer written to WORKDIR/tokenizer (by process 0, every
  process waiting for it; `sync=False` where one process calls this alone, e.g. an
  export, once the setup has written it: a collective there hung the run). Under
  `base.abstract_setup()` only configs are read (a folder's model_index.json, a preset
  name such as "sd15", or the random model's config) and params are ShapeDtypeStructs.
  A decoder-stage export's video decoder is dropped (the latent stages encode and
  decode frame-wise) unless `keep_video_decoder` (the decoder stage continuing it)."""
  if base.is_abstract():
    return _abstract_image_model(config, workdir, keep_video_decoder)
  if config.image_model:
    if not Path(config.image_model).is_dir():
      # (A preset name, as the pod configs hold for videoldm-compile, failed on
      # ".../sd15/model_index.json: missing", naming no config field.)
      raise FileNotFoundError(
          f"config.image_model={config.image_model!r}: no such folder; training starts "
          "from a converted model folder (videoldm-convert) or a stage export: pass "
          "--config.image_model=FOLDER (a preset name such as 'sd15' serves "
          "videoldm-compile alone)")
    image = pretrained.load(config.image_model)
    tok_dir = Path(config.image_model) / "tokenizer"
    if image.vae_temporal_config is not None and not keep_video_decoder:
      # A decoder-stage export: the UNet stages use the frame-wise autoencoder; the
      # temporal decoder is applied at generation time from its own folder.
      image.params["vae"], _ = partition.split(image.params["vae"])
      image.vae_temporal_config, image.decoder_training = None, {}
  else:
    image = pretrained.random_image_ldm(_random_image_model(config), RANDOM_IMAGE_MODEL)
    tok_dir = workdir / "tokenizer"
    if jax.process_index() == 0 and not (tok_dir / "vocab.json").exists():
      write_byte_level_tokenizer(str(tok_dir))
    if sync:
      distributed.wait_for_all("tokenizer written")
  tokenizer = None
  if image.text_config is not None:
    tokenizer = CLIPTokenizer.from_folder(str(tok_dir))
    check_tokenizer(tokenizer, image.text_config,
                    image_model_source(config, "text_encoder"))
  return image, tokenizer, tok_dir


def _abstract_image_model(config, workdir: Path, keep_video_decoder: bool):
  """`load_image_model` with ShapeDtypeStructs for params: a video export's temporal
  layers and (kept) video decoder included, so that the setup's checks of them run
  as in training."""
  from videoldm_jax.convert import presets
  name = config.image_model
  temporal = vae_temporal = None
  training = {}
  if name and (Path(name) / "model_index.json").is_file():
    index = pretrained.load_index(name)
    training = index.get("training") or {}  # (its null class: `null_class_label`)
    text = index.get("text_encoder")
    configs = (UNetConfig.from_dict(index["unet"]), VAEConfig.from_dict(index["vae"]),
               None if text is None else CLIPTextConfig.from_dict(text), index["scheduler"])
    source = str(Path(name) / "model_index.json")
    if index.get("temporal") is not None:
      temporal = TemporalConfig.from_dict(index["temporal"], source)
    if index.get("vae_temporal") is not None and keep_video_decoder:
      vae_temporal = VAETemporalConfig.from_dict(index["vae_temporal"], source)
  elif name:
    if name not in presets.PRESETS:
      raise FileNotFoundError(f"config.image_model={name!r} is neither a converted model "
                              f"folder nor a preset ({sorted(presets.PRESETS)})")
    p = presets.PRESETS[name]
    configs = (p.unet, p.vae, p.text, p.scheduler)
  else:
    r = _random_image_model(config)
    text = r.get("text_encoder")
    path = RANDOM_IMAGE_MODEL
    configs = (UNetConfig.from_config(r.unet, f"{path}.unet").validate(),
               VAEConfig.from_config(r.vae, f"{path}.vae"),
               None if text is None else CLIPTextConfig.from_config(text,
                                                                    f"{path}.text_encoder"),
               dict(r.scheduler))
  image = pretrained.PretrainedLDM(*configs, params={}, source="abstract",
                                   temporal_config=temporal,
                                   vae_temporal_config=vae_temporal, training=training)
  image.params = VideoLDM.from_pretrained(image, temporal).abstract_params()
  if vae_temporal is not None:
    image.params["vae"] = params_lib.abstract_params(
        AutoencoderKL(image.vae_config, vae_temporal),
        *vae_lib.example_inputs(image.vae_config, video=True))
  tok_dir = workdir / "tokenizer"
  if not (tok_dir / "vocab.json").exists():
    write_byte_level_tokenizer(str(tok_dir))  # token ids only need the right shape
  tokenizer = None
  if image.text_config is not None:
    tokenizer = CLIPTokenizer.from_folder(str(tok_dir))
    check_tokenizer(tokenizer, image.text_config,
                    image_model_source(config, "text_encoder"))
  return image, tokenizer, tok_dir


def batch_maker(tokenizer: Optional[CLIPTokenizer], max_length: int,
                num_classes: Optional[int] = None, label_field: str = "label",
                frame_tokens: bool = False, null_label: Optional[int] = None):
  """Input-pipeline batch -> the stage's batch (host NumPy): pixels or cached latents,
  caption tokens or cached text embeddings, the image-only flags, and for a
  class-conditional UNet (`num_classes`) the labels, checked to lie in its table (past
  it the embedding gives NaN: every step skipped; below 0 one wraps silently) and to
  differ from its null class (`null_label`, which dropped labels take).
  frame_tokens: also each frame's caption tokens (B, T, L), for a stage that conditions
  frames one by one (image_ldm)."""
  def make_batch(host: dict) -> dict:
    batch = {k: host[k] for k in ("video", "latents", "context", "image_only", "labels",
                                  "frame_labels") if k in host}
    if num_classes:
      if "labels" not in batch:
        raise ValueError(f"the UNet is class-conditional ({num_classes} classes), but the "
                         f"batches hold no labels: config.data.label_field={label_field!r} "
                         "names no field of the dataset")
      labels = np.asarray(batch.get("frame_labels", batch["labels"]))
      bad = sorted(set(labels[(labels < 0) | (labels >= num_classes)].tolist()))
      if bad:
        raise ValueError(f"config.data.label_field={label_field!r}: labels {bad[:5]} lie "
                         f"outside the UNet's classes 0..{num_classes - 1} "
                         "(unet.num_class_embeds)")
      if null_label is not None and (labels == null_label).any():
        # Its examples would train the unconditional branch as that class.
        raise ValueError(f"config.data.label_field={label_field!r}: label {null_label} "
                         "is the model's null class (null_class_label, the unconditional "
                         "branch of guidance), which no data label may use; give the "
                         "UNet one more class for it")
    if tokenizer is not None and "context" not in host:
      text = lambda c: c.decode() if isinstance(c, bytes) else str(c)
      batch["tokens"] = tokenizer([text(c) for c in host["caption"]], max_length=max_length)
      if frame_tokens and "frame_caption" in host:
        captions = np.asarray(host["frame_caption"])
        batch["frame_tokens"] = np.asarray(tokenizer(
            [text(c) for c in captions.reshape(-1)], max_length=max_length)).reshape(
                captions.shape + (-1,))
    return batch
  return make_batch


def batch_labels(batch: dict):
  """The class labels to condition on: per frame (B*T,) where the input pipeline gave
  them (an image example's frames come from different clips), else per video (B,)."""
  if "frame_labels" in batch:
    return batch["frame_labels"].reshape(-1)
  return batch.get("labels")


def sample_labels(unet_config, config: ml_collections.ConfigDict,
                  null_label: Optional[int] = None) -> Optional[list[int]]:
  """Class labels of the training samples (one per config.sample.prompts) for a
  class-conditional UNet, None otherwise: config.sample.class_labels, or sample i gets
  the i-th class (cyclically) other than the null class `null_label`. Checked at setup
  (`setup_video_ldm`), not first at the first samples."""
  n_classes, s = unet_config.num_class_embeds, config.sample
  if not n_classes:
    return None
  classes = [c for c in range(n_classes) if c != null_label] or [0]
  labels = [int(x) for x in s.get("class_labels", ())] or [
      classes[i % len(classes)] for i in range(len(s.prompts))]
  if len(labels) != len(s.prompts) or not all(0 <= x < n_classes for x in labels):
    raise ValueError(f"config.sample.class_labels={tuple(labels)}: expected one label in "
                     f"[0, {n_classes}) per prompt ({len(s.prompts)} prompts)")
  if null_label is not None and null_label in labels:
    # Both branches of guidance would take the null class: an unconditional sample
    # logged as that label's.
    raise ValueError(f"config.sample.class_labels={tuple(labels)}: {null_label} is the "
                     "model's null class (null_class_label, the unconditional branch of "
                     f"guidance); expected data classes, i.e. not {null_label}")
  return labels


def video_sampler(ldm: VideoLDM, tokenizer: Optional[CLIPTokenizer],
                  config: ml_collections.ConfigDict):
  """(params, step) -> uint8 samples of config.sample.prompts: videos (N, T, H, W, 3), or
  one-frame clips for an image model."""
  def sample(params: dict, step: int) -> np.ndarray:
    model = pretrained_from(ldm, params)
    s = config.sample
    frames = s.num_frames if ldm.temporal_config is not None else 0
    options = sampling.SampleOptions(
        height=config.data.height, width=config.data.width, num_steps=s.steps,
        guidance_scale=s.guidance_scale, seed=config.seed, num_frames=frames,
        progress=False)
    videos = sampling.generate(model, tokenizer, list(s.prompts), "", options,
                               class_labels=sample_labels(ldm.unet_config, config,
                                                          ldm.null_class_label))
    return videos[:, None] if videos.ndim == 4 else videos
  return sample


def pretrained_from(ldm: VideoLDM, params: dict, **fields) -> pretrained.PretrainedLDM:
  """The model `ldm` with `params` (a train state's) as the samplers take it, its null
  class (guidance's unconditional label) in its `training` record."""
  training = ({} if ldm.null_class_label is None
              else {"null_class_label": ldm.null_class_label})
  return pretrained.PretrainedLDM(ldm.unet_config, ldm.vae_config, ldm.text_config,
                                  ldm.scheduler, params, temporal_config=ldm.temporal_config,
                                  training={**training, **fields.pop("training", {})},
                                  **fields)


def training_record(config: ml_collections.ConfigDict, ldm: VideoLDM) -> dict:
  """`pretrained.training_record` plus the UNet's null class, where it has one."""
  record = pretrained.training_record(config)
  if ldm.null_class_label is not None:
    record["null_class_label"] = ldm.null_class_label
  return record


def ldm_exporter(ldm: VideoLDM, tok_dir: Path, source: str, training: dict):
  """(out_dir, params) -> writes a `pretrained` folder (what videoldm-sample reads);
  training: `pretrained.training_record` of the stage's config."""
  def export(out: Path, params: dict) -> None:
    model = pretrained_from(ldm, params, source=source, training=training)
    pretrained.save(out, model, tok_dir if ldm.text_config is not None else None)
  return export


def setup_video_ldm(config: ml_collections.ConfigDict, workdir: Path,
                    temporal: Optional[TemporalConfig], make_stage_fn,
                    frame_tokens: bool = False) -> StageSetup:
  """The StageSetup of a stage that trains (part of) the video LDM's UNet on clips:
  `make_stage_fn(ldm, options, uncond_tokens) -> Stage`. New parameters (those the image
  model lacks, e.g. phi) are initialised on the host; the rest come from the image model.
  frame_tokens: batches also carry each frame's caption tokens (`batch_maker`); on
  whenever config.data.image_fraction > 0, whose image examples' frames come from
  different clips, each with its own caption."""
  image, tokenizer, tok_dir = load_image_model(config, workdir)
  f = sampling.size_multiple(image.unet_config, image.vae_config)
  if config.data.height % f or config.data.width % f:
    # (else XLA fails deep in the UNet, concatenating skips of mismatched sizes)
    raise ValueError(f"config.data.height and width must be multiples of {f} for this "
                     f"model (VAE factor x 2^(UNet levels - 1)); got "
                     f"{config.data.height}x{config.data.width}")
  ldm = dataclasses.replace(
      VideoLDM.from_pretrained(image, temporal, config.train.compute_dtype,
                               config.train.remat_policy),
      null_class_label=null_class_label(config, image))
  if "sample" in config and config.sample.get("every", 0):
    try:  # before training, not at the first samples
      sampling.check_context_source(image, image_model_source(config))
    except ValueError as e:
      raise ValueError(f"{e}; or train without samples (--config.sample.every=0)") from None
    sample_labels(ldm.unet_config, config, ldm.null_class_label)
  max_len = 0 if ldm.text_config is None else ldm.text_config.max_position_embeddings
  uncond = None if tokenizer is None else tokenizer([""], max_length=max_len)[0]
  stage = make_stage_fn(ldm, options_from_config(config, ldm.null_class_label), uncond)
  holder = {"image": image}
  abstract = ldm.abstract_params()
  if base.is_abstract():
    # The check init_params makes (never called here): a video export's temporal layers
    # under another config.temporal are refused by videoldm-compile as by training.
    fit_unet(image.params["unet"], abstract["unet"], image_model_source(config))

  def init_params(need: Optional[Callable[[tuple], bool]] = None) -> dict:
    model = holder.pop("image")  # the host copy is released once it is in the train state
    unet = fit_unet(model.params["unet"], abstract["unet"], image_model_source(config))
    new = ldm.init_unet_params(config.seed, where=init_where(need, "unet", _flat_keys(unet)))
    return {**model.params, "unet": merge(unet, new)}

  cache_check = {}
  if config.data.kind == "latent_cache" and not base.is_abstract():
    # Fingerprints (strings), not the parameter trees: the iterator lives as long as
    # the run, and trees held here would keep the host copy of the VAE and text
    # encoder that init_params hands over. (An abstract setup, videoldm-compile, has
    # no weights and reads no data.)
    cache_check = {"vae_config": ldm.vae_config.to_dict(),
                   "fingerprints": latent_cache.model_fingerprints(
                       image.params["vae"], image.params.get("text_encoder"),
                       # the whole VAE's only for a cache that predates 'encoder'
                       whole_vae="encoder_fingerprint" not in latent_cache.read_info(
                           config.data.cache_dir)),
                   "text_config": None if ldm.text_config is None else ldm.text_config.to_dict(),
                   # A text-to-image UNet without its text encoder needs the cache's
                   # embeddings too (it would get no context at all).
                   "needs_context": (ldm.text_config is not None
                                     or sampling.missing_context(image) is not None)}
  return StageSetup(
      stage=stage, abstract_params=abstract, logical_axes=ldm.logical_axes(),
      init_params=init_params,
      make_iterator=lambda: inputs.make_iterator(config, workdir, cache_check),
      make_batch=batch_maker(tokenizer, max_len, ldm.unet_config.num_class_embeds,
                             config.data.get("label_field", "label"),
                             frame_tokens or config.data.get("image_fraction", 0.0) > 0,
                             ldm.null_class_label),
      optimizer=optim.make_optimizer(config.optim),
      lr_schedule=optim.learning_rate(config.optim),
      export=ldm_exporter(ldm, tok_dir, str(workdir), training_record(config, ldm)),
      samples_per_step=config.data.batch_size,
      sample=video_sampler(ldm, tokenizer, config),
      extra={"ldm": ldm, "tokenizer": tokenizer, "tokenizer_dir": tok_dir})


def fit_unet(params: dict, abstract: dict, source: str) -> dict:
  """The UNet parameters of the image model (`source`) that the stage's UNet has
  (`abstract`, its tree of shapes): a video export's layers the stage lacks (its
  temporal layers for the image_ldm stage, a predictor's context encoder for the
  key-frame stage) are left out with a note; a kept layer of another shape (e.g. a
  key-frame export's temporal layers under another config.temporal) is refused, naming
  its path and both shapes."""
  flat, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(abstract)
  extra = sorted(k for k in flat if k not in want)
  if extra and jax.process_index() == 0:
    print(f"note: {source}: {len(extra)} UNet parameters the stage's model does not have "
          f"are left out (e.g. {'/'.join(extra[0])})", file=sys.stderr)
  kept = {k: v for k, v in flat.items() if k in want}
  try:
    partition.check_same_structure(traverse_util.unflatten_dict({k: want[k] for k in kept}),
                                   traverse_util.unflatten_dict(kept),
                                   what="the UNet parameters", source=source)
  except ValueError as e:
    raise ValueError(f"{e}\n(a video export's temporal layers must keep the shapes they "
                     "were trained with: config.temporal of the key-frame stage, "
                     "config.context_channels of the predictor and interpolator)") from None
  return traverse_util.unflatten_dict(kept)


def _flat_keys(tree: dict) -> set:
  return set(traverse_util.flatten_dict(tree))


def setup(config: ml_collections.ConfigDict, workdir: Path) -> StageSetup:
  """The key-frame stage of `config` (configs/keyframe_*.py)."""
  # Checked before the image model loads, naming the fields as --config.temporal.* does.
  temporal = TemporalConfig.from_config(config.temporal, "config.temporal")
  return setup_video_ldm(config, workdir, temporal.validate("config.temporal"), make_stage)
