"""The pipeline's stages, one script each: ``python -m stages.<name>`` (see dvc.yaml).

``python -m stages.<name>`` imports this package before the stage's own module, so importing
facesearch here sets its thread wait policy (see facesearch/__init__.py) before the stage
imports torch, whatever the order of the stage's imports.
"""

import facesearch  # noqa: F401
