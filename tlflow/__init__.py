"""tlflow: transfer learning on images as a cached, versioned pipeline (Prefect + DVC + HDF5).

The import package maps the repository's folders (pyproject.toml, setuptools `package-dir`):
`tlflow` is this folder, `tlflow.flows` is flows/ (the Prefect flow and the command line) and
`tlflow.tasks` is tasks/ (one module per stage, and tasks/lib, the machinery they share).
"""

__version__ = "0.1.0"  # the one place the version is said (pyproject.toml reads it)
