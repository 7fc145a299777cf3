"""The version of kda_ext: the one place it is written (pyproject.toml and setup.py read it here)."""

__version__ = "0.1.0"
