"""The faces room: from a photo to the face crop a model sees.

Detectors, one file each behind :func:`facesearch.faces.detectors.get_detector` (``haar``, ``dlib_hog``;
``yunet`` stands beside them), landmark alignment, the crop settings (:class:`facesearch.faces.config.FaceConfig`,
``params.yaml: crop``), the crop stage's per-file pipeline (``cropping``) and where the detectors' model files
are (``dlib_models``, ``zoo``, ``onnx_weights``). Imports the data room only.
"""
