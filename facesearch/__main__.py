"""``python -m facesearch``: see :mod:`facesearch.cli`."""

from facesearch.tools.cli import main

if __name__ == "__main__":
    main()
