"""The data room: photo folders and their layouts, the manifest's tables, decoding untrusted bytes, the
synthetic sample, and the packed arrays the training loop reads.

The first room of the flow (data <- faces <- nets <- retrieval <- gallery <- tools): it imports no other
room, only the top-level helpers (``facesearch.io``, ``params``, ``provenance``, ``viz``).
"""
