"""The one version string (pyproject.toml and kfuse.__version__ read it)."""
__version__ = "0.1.0"
