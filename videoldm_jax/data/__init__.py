"""Training data sources. `procedural` is a built-in synthetic dash-cam stream used until
the TFDS pipeline (`data_pipelines/`) is wired into the trainer."""

from videoldm_jax.data.procedural import ClipIterator, make_clip

__all__ = ["ClipIterator", "make_clip"]
