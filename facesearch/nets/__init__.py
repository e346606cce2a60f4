"""The nets room: embedding networks and how they are trained, saved and run.

The backbone registry (:func:`facesearch.nets.models.get_model`), one file per backbone, the distances and
losses, the training loop's machinery, batched inference, and what a model file promises its users
(``contract``: its preprocessing and the identities it has seen). Imports the data and faces rooms.
"""
