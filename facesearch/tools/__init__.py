"""The tools room: the ``facesearch`` command line (``python -m facesearch``) and the commands behind it.

The last room of the flow: it may import every other one, and nothing imports it (but ``facesearch.__main__``).
"""
