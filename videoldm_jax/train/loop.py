"""`train_and_evaluate(config, workdir)`: the training job of a stage, start to end.

Builds the mesh and the models, restores the newest checkpoint in `workdir` (or
initialises phi and takes theta from the image model), then loops: host batch ->
global arrays -> the stage's jitted step. It logs loss, step time, samples/s and MFU
to the console and TensorBoard, checkpoints (train state + data-iterator state +
config) on schedule and on SIGTERM, samples videos, and finally exports an inference
model folder (theta + EMA phi) that `videoldm-sample` reads.
"""

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from videoldm_jax import pretrained, sharding, video_io
from videoldm_jax.data import inputs
from videoldm_jax.models import partition
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.tokenizer import CLIPTokenizer, write_byte_level_tokenizer
from videoldm_jax.pipelines import sampling
from videoldm_jax.stages import image_ldm, keyframe
from videoldm_jax.train import optim, perf
from videoldm_jax.train import step as step_lib
from videoldm_jax.train.checkpointing import Checkpointer, PreemptionGuard
from videoldm_jax.video_ldm import VideoLDM


STAGES = {"keyframe": keyframe, "image_ldm": image_ldm}


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def load_image_model(config, workdir: Path):
  """(PretrainedLDM, tokenizer, tokenizer folder) from config.image_model or a random one."""
  if config.image_model:
    image = pretrained.load(config.image_model)
    tok_dir = Path(config.image_model) / "tokenizer"
  else:
    image = pretrained.random_image_ldm(config.random_image_model)
    tok_dir = workdir / "tokenizer"
    if jax.process_index() == 0 and not (tok_dir / "vocab.json").exists():
      write_byte_level_tokenizer(str(tok_dir))
    multihost_utils.sync_global_devices("tokenizer written")
  tokenizer = None
  if image.text_config is not None:
    tokenizer = CLIPTokenizer.from_folder(str(tok_dir))
  return image, tokenizer, tok_dir


def make_batch(host: dict, tokenizer, max_length: int) -> dict:
  """Input-pipeline batch -> the key-frame stage's batch (host NumPy): pixels or cached
  latents, caption tokens or cached text embeddings, the image-only flags."""
  batch = {k: host[k] for k in ("video", "latents", "context", "image_only") if k in host}
  if tokenizer is not None and "context" not in host:
    batch["tokens"] = tokenizer([c.decode() if isinstance(c, bytes) else str(c)
                                 for c in host["caption"]], max_length=max_length)
  return batch


def _to_global(batch: dict, batch_sharding: NamedSharding, process_count: int) -> dict:
  def put(x):
    global_shape = (x.shape[0] * process_count,) + x.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding, x, global_shape)
  return {k: put(np.asarray(v)) for k, v in batch.items()}


def _gathered(tree):
  """Full host copies of (possibly multi-host sharded) arrays."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def export(workdir: Path, ldm: VideoLDM, state, tok_dir: Path, step: int) -> Path:
  """Writes workdir/export/step_N: the image model with theta and EMA phi, loadable by
  `pretrained.load` and `videoldm-sample`."""
  params = _gathered(state.merged(use_ema=True))
  out = workdir / "export" / f"step_{step}"
  if jax.process_index() == 0 and not out.exists():
    model = pretrained.PretrainedLDM(ldm.unet_config, ldm.vae_config, ldm.text_config,
                                ldm.scheduler, params, source=str(workdir),
                                temporal_config=ldm.temporal_config)
    pretrained.save(out, model, tok_dir if ldm.text_config is not None else None)
  multihost_utils.sync_global_devices("exported")
  return out


def sample_videos(workdir: Path, ldm: VideoLDM, state, tokenizer, config, step: int,
                  writer) -> None:
  """EMA samples of config.sample.prompts -> workdir/samples/step_N.{mp4,gif} + TB frames."""
  params = _gathered(state.merged(use_ema=True))
  model = pretrained.PretrainedLDM(ldm.unet_config, ldm.vae_config, ldm.text_config,
                              ldm.scheduler, params, temporal_config=ldm.temporal_config)
  s = config.sample
  # An image model (image_ldm stage) samples images: one-frame clips.
  frames = s.num_frames if ldm.temporal_config is not None else 0
  options = sampling.SampleOptions(
      height=config.data.height, width=config.data.width, num_steps=s.steps,
      guidance_scale=s.guidance_scale, seed=config.seed, num_frames=frames,
      progress=False)
  videos = sampling.generate(model, tokenizer, list(s.prompts), "", options)
  if videos.ndim == 4:
    videos = videos[:, None]
  if jax.process_index() != 0:
    return
  clip = video_io.video_grid(videos, cols=len(videos), pad=2)
  out = workdir / "samples" / f"step_{step}.mp4"
  out.parent.mkdir(parents=True, exist_ok=True)
  video_io.write_mp4(str(out), clip, fps=8)
  video_io.write_gif(str(out.with_suffix(".gif")), clip, fps=8)
  if writer is not None:  # first, middle and last frame of every clip
    frames = clip[[0, len(clip) // 2, len(clip) - 1]]
    writer.add_image("samples", np.concatenate(list(frames), axis=0), step,
                     dataformats="HWC")
  log(f"samples: {out}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the stage `config.stage`; returns the last logged metrics."""
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}; implemented: {sorted(STAGES)}")
  image, tokenizer, tok_dir = load_image_model(config, workdir)
  temporal = (None if config.stage == "image_ldm"
              else TemporalConfig.from_dict(dict(config.temporal)))
  ldm = VideoLDM.from_pretrained(image, temporal, config.train.compute_dtype,
                                 config.train.remat_policy)
  mesh = sharding.make_mesh(dict(config.mesh), dcn_shape=dict(config.get("dcn_mesh", {})))
  rules = [tuple(r) for r in config.rules]
  abstract = ldm.abstract_params()
  param_sh = sharding.shardings_for(ldm.logical_axes(), mesh, abstract, rules)
  max_len = 0 if ldm.text_config is None else ldm.text_config.max_position_embeddings
  uncond = None if tokenizer is None else tokenizer([""], max_length=max_len)[0]
  stage = STAGES[config.stage].make_stage(ldm, keyframe.KeyframeOptions(
      mode=config.mode, cond_drop_prob=config.cond_drop_prob,
      min_snr_gamma=config.get("min_snr_gamma")), uncond)
  tx = optim.make_optimizer(config.optim)
  shardings = step_lib.state_shardings(param_sh, stage, tx, abstract, mesh)
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.train.keep,
                      keep_best=config.train.keep_best,
                      save_interval_steps=config.train.ckpt_every)
  pc, pi = jax.process_count(), jax.process_index()
  data = inputs.make_iterator(config, workdir, ldm.vae_config.to_dict(), image.params["vae"])

  if ckpt.latest_step() is not None:
    target = step_lib.abstract_state(
        step_lib.abstract_train_state(abstract, stage, tx), shardings)
    state, data_state, _ = ckpt.restore(target)
    data.set_state(data_state)
    log(f"resumed from {ckpt.directory}/{ckpt.latest_step()}")
  else:
    phi = ldm.init_unet_params(config.seed, where=partition.is_temporal)
    unet = traverse_util.unflatten_dict({**traverse_util.flatten_dict(image.params["unet"]),
                                         **traverse_util.flatten_dict(phi)})
    state = step_lib.init_state({**image.params, "unet": unet}, stage, tx, shardings)
  image.params = None  # theta now lives (sharded) in the train state: free the host copy

  batch_sh = NamedSharding(mesh, PartitionSpec(tuple(config.batch_axes)))
  train_step = step_lib.build_train_step(
      stage, tx, seed=config.seed, ema_decay=config.optim.ema_decay,
      grad_accum=config.train.grad_accum, lr_schedule=optim.learning_rate(config.optim),
      shardings=shardings, batch_sharding=batch_sh)
  step = int(state.step)
  first = _to_global(make_batch(next(data), tokenizer, max_len), batch_sh, pc)
  t0 = time.perf_counter()
  compiled = train_step.lower(state, first).compile()
  flops = perf.compiled_flops(compiled)
  peak = perf.matmul_peak_flops()
  log(f"{stage.name}: compiled in {time.perf_counter() - t0:.1f}s; "
      f"{flops / 1e9:.2f} GFLOP/step/device; matmul peak {peak / 1e9:.0f} GFLOP/s/device")
  writer = perf.summary_writer(workdir / "tb")
  n_params = {k: sum(x.size for x in jax.tree_util.tree_leaves(v))
              for k, v in (("trainable", state.trainable), ("frozen", state.frozen))}
  log(f"params: {n_params['trainable'] / 1e6:.2f}M trainable, "
      f"{n_params['frozen'] / 1e6:.2f}M frozen; start at step {step}")

  last = {}
  batch, t_last, step_last = first, time.perf_counter(), step
  with PreemptionGuard() as guard:
    while step < config.train.num_steps:
      state, metrics = compiled(state, batch)
      step += 1
      stop = guard.any_process_requested() if pc > 1 else guard.stop_requested
      if step % config.train.log_every == 0 or step == config.train.num_steps or stop:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = (time.perf_counter() - t_last) / max(step - step_last, 1)
        m.update(step_time=dt, samples_per_s=config.data.batch_size / dt,
                 mfu=flops / dt / peak)
        t_last, step_last, last = time.perf_counter(), step, m
        log(f"step {step}: loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3f} "
            f"lr {m.get('lr', 0):.2e} {dt:.3f}s/step {m['samples_per_s']:.2f} samples/s "
            f"MFU {m['mfu']:.1%} skipped {int(m['skipped'])}")
        if writer is not None:
          for k, v in m.items():
            writer.add_scalar(f"train/{k}", v, step)
      if ckpt.should_save(step) or stop or step == config.train.num_steps:
        ckpt.save(step, state, data_state=data.get_state(), config=config.to_dict(),
                  metrics={"loss": float(metrics["loss"])}, force=True)
      if stop:
        log(f"stop requested (signal): saved step {step}, exiting")
        break
      every = config.sample.every
      if every and (step % every == 0 or step == config.train.num_steps):
        sample_videos(workdir, ldm, state, tokenizer, config, step, writer)
      if step < config.train.num_steps:
        batch = _to_global(make_batch(next(data), tokenizer, max_len), batch_sh, pc)
  ckpt.wait_until_finished()
  if step >= config.train.num_steps and config.train.export:
    out = export(workdir, ldm, state, tok_dir, step)
    log(f"exported {out}")
  ckpt.close()
  if writer is not None:
    writer.close()
  if pi == 0:
    (workdir / "last_metrics.json").write_text(json.dumps(dict(last, step=step), indent=1))
  return last
