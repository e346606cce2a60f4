"""The gallery room: your own photos, indexed and searched, and the app's logic.

A versioned index folder (``store``), building and updating it (``build``), searching it (``search``),
the one per-photo path (``photos``) and the app without Streamlit (``app_core``). Imports every room
before it (data, faces, nets, retrieval).
"""
