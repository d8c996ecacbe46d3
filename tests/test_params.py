"""The abstract parameter tree is traced once per (module, input shapes) and reused."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from videoldm_jax.models import params as params_lib
from videoldm_jax.models.unet import UNet, UNetConfig


def _unet(width: int) -> UNet:
  return UNet(UNetConfig(block_out_channels=(width,), layers_per_block=1,
                         attention_levels=(False,), num_heads=(1,), cross_attention_dim=8,
                         norm_num_groups=8))


def test_abstract_tree_of_a_method_is_its_own():
  # The cache is keyed by the method too: a tree traced through another method (an
  # encoder alone) is not the whole module's.
  class TwoParts(nn.Module):
    def setup(self):
      self.first, self.second = nn.Dense(3), nn.Dense(5)

    def __call__(self, x):
      return self.second(self.first(x))

    def encode(self, x):
      return self.first(x)

  x = jnp.zeros((1, 4))
  assert set(params_lib.abstract_params(TwoParts(), x)) == {"first", "second"}
  assert set(params_lib.abstract_params(TwoParts(), x, method=TwoParts.encode)) == {"first"}


def test_abstract_tree_is_traced_once_per_module_and_shapes(monkeypatch):
  traced = []
  real = jax.eval_shape
  monkeypatch.setattr(params_lib.jax, "eval_shape", lambda f: traced.append(1) or real(f))
  params_lib._ABSTRACT_CACHE.clear()
  x, t, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 1, 8))
  first = params_lib.abstract_params(_unet(16), x, t, ctx)
  # An equal module with inputs of the same shapes (a ShapeDtypeStruct is as good as an
  # array): the cached tree, and the axes come from it too.
  again = params_lib.abstract_params(_unet(16), jax.ShapeDtypeStruct(x.shape, x.dtype), t, ctx)
  params_lib.logical_axes(_unet(16), x, t, ctx)
  assert len(traced) == 1 and again == first
  # Another width or another input shape is traced anew and has its own shapes.
  wider = params_lib.abstract_params(_unet(32), x, t, ctx)
  params_lib.abstract_params(_unet(16), jnp.zeros((1, 16, 16, 4)), t, ctx)
  assert len(traced) == 3
  assert wider["conv_in"]["kernel"].shape == (3, 3, 4, 32) != first["conv_in"]["kernel"].shape


def test_fresh_parameters_have_their_scale_and_a_seed_per_path():
  # LeCun normal: std 1 / sqrt(fan_in) with fan_in = KH * KW * C_in for a conv kernel
  # (C_in alone started from-scratch 3x3 convs 3x too large); each leaf drawn from a
  # seed of its whole path (a seed of its name alone made every same-shaped 'kernel'
  # equal: conv1 = conv2, to_q = to_k = to_v).
  import numpy as np
  from flax import traverse_util
  x, t, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 1, 8))
  p = traverse_util.flatten_dict(params_lib.init_params(_unet(16), 0, x, t, ctx))
  res = ("down_blocks_0", "resnets_0")
  conv1, conv2 = p[res + ("conv1", "kernel")], p[res + ("conv2", "kernel")]
  assert conv1.shape == conv2.shape == (3, 3, 16, 16) and not np.array_equal(conv1, conv2)
  # ... and of its first part: the same layer in another block draws other values.
  mid = p[("mid_block", "resnets_0", "conv1", "kernel")]
  assert mid.shape == conv1.shape and not np.array_equal(mid, conv1)
  assert abs(conv1.std() * np.sqrt(3 * 3 * 16) - 1) < 0.1, conv1.std()  # 2304 draws
  dense = p[("time_embedding", "linear_1", "kernel")]
  assert abs(dense.std() * np.sqrt(dense.shape[0]) - 1) < 0.15, (dense.shape, dense.std())
  again = traverse_util.flatten_dict(params_lib.init_params(_unet(16), 0, x, t, ctx))
  other = traverse_util.flatten_dict(params_lib.init_params(_unet(16), 1, x, t, ctx))
  np.testing.assert_array_equal(again[res + ("conv1", "kernel")], conv1)
  assert not np.array_equal(other[res + ("conv1", "kernel")], conv1)


def test_abstract_cache_keys_the_input_dtype_and_drops_the_least_recently_used(monkeypatch):
  class Typed(nn.Module):  # a parameter of its input's dtype
    @nn.compact
    def __call__(self, x):
      return x * self.param("w", nn.initializers.zeros, (2,), x.dtype)

  params_lib._ABSTRACT_CACHE.clear()
  dtypes = [params_lib.abstract_params(Typed(), jnp.zeros(2, d))["w"].dtype
            for d in (jnp.float32, jnp.bfloat16)]
  assert dtypes == [jnp.float32, jnp.bfloat16]
  monkeypatch.setattr(params_lib, "_ABSTRACT_CACHE_SIZE", 2)
  params_lib._ABSTRACT_CACHE.clear()
  for width in (1, 2, 1, 3):  # 1 is used again after 2: 2 goes when 3 comes
    params_lib.abstract_params(nn.Dense(width), jnp.zeros((1, 1)))
  assert [key[0].features for key in params_lib._ABSTRACT_CACHE] == [1, 3]
