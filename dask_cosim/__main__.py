"""``python -m dask_cosim`` runs the ``dask-cosim`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
