"""PyTorch -> ONNX export of multi-exit models into runtime bundles (needs the `export` extra).

>>> from autocontrast.export import ExportOptions, export_bundle
>>> export_bundle("path/to/model", "bundle", options=ExportOptions(exits=(30, 15)))  # doctest: +SKIP
"""

from autocontrast.export.exporter import ExportOptions, ExportResult, export_bundle

__all__ = ["ExportOptions", "ExportResult", "export_bundle"]
