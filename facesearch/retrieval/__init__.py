"""The retrieval room: searching embeddings and scoring the searches.

Nearest-neighbour backends (``knn``), the metrics (``metrics``), gallery-side re-ranking (``rerank``),
verification and open-set identification (``verification``) and the verdict a search's user gets
(``verdict``), the query/gallery protocol (``protocol``). Imports the data, faces and nets rooms.
"""
