"""facesearch: face image retrieval as a staged, reproducible DVC pipeline.

Code shared by several stages (``stages/``) and the app lives here; every
module is import-safe (no work at import time).
"""

__version__ = "0.1.0"
