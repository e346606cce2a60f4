"""``python -m facesearch``: see :mod:`facesearch.tools.cli`."""

from facesearch.tools.cli import main

if __name__ == "__main__":
    main()
