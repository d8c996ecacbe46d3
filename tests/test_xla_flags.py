"""The package's XLA defaults: added at import, before the backend starts, so they reach
XLA in programs that import jax first; a user's own value of a flag wins; the opt-out
leaves XLA_FLAGS alone. What XLA received is read back from its own dump of the debug
options of a real compiled program."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from videoldm_jax import xla_flags

ROOT = Path(__file__).parents[1]
FLAG = xla_flags.YNN_FUSION_FLAG


def test_with_defaults_appends_and_respects_user_values():
  assert xla_flags.with_defaults("") == f"--{FLAG}=-individual_convolution"
  assert (xla_flags.with_defaults("--xla_force_host_platform_device_count=8")
          == f"--xla_force_host_platform_device_count=8 --{FLAG}=-individual_convolution")
  # The user's value, even an empty one, is kept as given and not duplicated.
  for own in (f"--{FLAG}=individual_convolution", f"--{FLAG}="):
    assert xla_flags.with_defaults(f"--xla_dump_to=/x {own}") == f"--xla_dump_to=/x {own}"


def test_a_flags_file_and_spacing_are_kept(tmp_path):
  # XLA_FLAGS not starting with "-" names a file of flags: appending to it made XLA
  # abort on a file called "path --flag"; its flags are used instead.
  path = tmp_path / "flags.txt"
  path.write_text("--xla_force_host_platform_device_count=3\n")
  assert (xla_flags.with_defaults(str(path))
          == f"--xla_force_host_platform_device_count=3 --{FLAG}=-individual_convolution")
  path.write_text(f"--{FLAG}=individual_convolution\n")  # the file's own value wins
  assert xla_flags.with_defaults(str(path)) == f"--{FLAG}=individual_convolution"
  assert xla_flags.with_defaults(str(tmp_path / "missing")) == str(tmp_path / "missing")
  # Leading spaces before a flag (XLA skips them) do not make it a file name.
  assert (xla_flags.with_defaults(" --xla_force_host_platform_device_count=3")
          == f" --xla_force_host_platform_device_count=3 --{FLAG}=-individual_convolution")
  # The user's string as written (quoted values with several spaces).
  assert xla_flags.with_defaults('--xla_dump_to="a  b"') == (
      f'--xla_dump_to="a  b" --{FLAG}=-individual_convolution')
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": str(tmp_path / "three.txt")}
  (tmp_path / "three.txt").write_text("--xla_force_host_platform_device_count=3")
  out = subprocess.run([sys.executable, "-c", "import videoldm_jax, jax; "
                        "print(jax.device_count())"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr[-2000:]


def test_apply_defaults_opt_out():
  env = {"XLA_FLAGS": "--a=1", xla_flags.OPT_OUT_ENV: "0"}
  xla_flags.apply_defaults(env)
  assert env["XLA_FLAGS"] == "--a=1"
  env = {}
  xla_flags.apply_defaults(env)
  assert env["XLA_FLAGS"] == f"--{FLAG}=-individual_convolution"
  # A child that opts out inherits its parent's XLA_FLAGS: the defaults the parent's
  # import added are taken out again (the bench's A/B of the flag compared equals).
  child = {**env, xla_flags.OPT_OUT_ENV: "0"}
  child["XLA_FLAGS"] = "--a=1 " + child["XLA_FLAGS"]
  xla_flags.apply_defaults(child)
  assert child["XLA_FLAGS"] == "--a=1" and xla_flags.ADDED_ENV not in child
  # The rest of the user's string is kept as written (a quoted value's two spaces were
  # collapsed to one: another path).
  child = {**env, xla_flags.OPT_OUT_ENV: "0"}
  child["XLA_FLAGS"] = "--xla_dump_to='/tmp/a  b' " + child["XLA_FLAGS"] + " --b=2"
  xla_flags.apply_defaults(child)
  assert child["XLA_FLAGS"] == "--xla_dump_to='/tmp/a  b' --b=2"
  # ... but not the user's own value of the flag.
  own = {"XLA_FLAGS": f"--{FLAG}=-individual_convolution"}
  xla_flags.apply_defaults(own)
  assert xla_flags.ADDED_ENV not in own


def test_a_default_the_users_flags_file_sets_is_theirs(tmp_path):
  # Compared against the file's path, the user's own flag counted as added: a child
  # that opted out took it out of the user's flags.
  path = tmp_path / "flags.txt"
  path.write_text(f"--xla_dump_to=/tmp/x --{FLAG}=-individual_convolution\n")
  env = {"XLA_FLAGS": str(path)}
  xla_flags.apply_defaults(env)
  assert xla_flags.ADDED_ENV not in env
  child = {**env, xla_flags.OPT_OUT_ENV: "0"}
  xla_flags.apply_defaults(child)
  assert child["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x",
                                        f"--{FLAG}=-individual_convolution"]


def _ynn_types_xla_used(tmp_path, xla_flags_env: str) -> list[str]:
  """The YNNPACK fusion types in XLA's dumped debug options of a conv compiled in a
  fresh process that imports jax first and videoldm_jax second (as conftest does)."""
  dump = tmp_path / "dump"
  code = ("import jax, jax.numpy as jnp\n"
          "import videoldm_jax\n"
          "x = jnp.ones((1, 8, 8, 4)); w = jnp.ones((3, 3, 4, 4))\n"
          "jax.jit(lambda x, w: jax.lax.conv_general_dilated(\n"
          "    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, w)\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_dump_to={dump} {xla_flags_env}".strip()}
  env.pop(xla_flags.OPT_OUT_ENV, None)
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                 capture_output=True, timeout=120)
  options = sorted(dump.glob("*lambda*.debug_options"))
  assert options, sorted(p.name for p in dump.iterdir())
  return [line.split(":", 1)[1].strip() for line in options[0].read_text().splitlines()
          if line.startswith(FLAG)]


@pytest.mark.parametrize("own, expected", [
    ("", {"LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_REDUCE"}),
    (f"--{FLAG}=individual_convolution", {"LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}),
])
def test_defaults_reach_xla(tmp_path, own, expected):
  """Without a user value XLA gets its default list minus individual convolutions (the
  dump names the types it kept); with one, exactly the user's."""
  assert set(_ynn_types_xla_used(tmp_path, own)) == expected


def test_this_suite_runs_with_the_defaults():
  """The parity tests run under the defaults too: conftest imports jax, the test modules
  import videoldm_jax, and nothing has computed in between."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  if os.environ.get(xla_flags.OPT_OUT_ENV) == "0" or any(
      f.startswith(f"--{FLAG}=") and f != f"--{FLAG}=-individual_convolution" for f in flags):
    pytest.skip("the suite was started with its own value of the flag or the opt-out")
  assert f"--{FLAG}=-individual_convolution" in flags
