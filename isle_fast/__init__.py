"""isle-fast: ISLE, the class-wise ensemble of WSSS pseudo-labels, as a fast array pipeline.

The public API, in the order of the pipeline (see README.md; DESIGN.md for the
data model):

* stores: :func:`create_stack`, :func:`open_stack`, :class:`Stack`, :func:`check_aligned`
* ingest: :func:`ingest_labels`, :func:`ingest_scores`, :func:`ingest_images`,
  :func:`ingest_tiff`, :func:`ingest_arrays`, :func:`ingest_dask`
* step 1, refinement: :func:`refine_stack`, :func:`register_refinement`
* step 2, evaluation and selection: :func:`evaluate`, :func:`select`, :func:`subset_analysis`
* step 3, the ensemble: :func:`merge`, :func:`export_pngs`, :func:`report`
* step 4, DeepLabV3+: :func:`build_deeplab`, :func:`train`, :func:`predict`
* data: :func:`make_voc_like` (synthetic VOC-like data sets), :func:`voc_palette`
* backend switch: :func:`get_kernels`, :func:`resolve_backend`, :func:`gpu_available`

Names are resolved lazily (PEP 562), so ``import isle_fast`` stays light and
torch is only imported by the functions that need it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> defining submodule
_EXPORTS: dict[str, str] = {
    # errors
    "IsleError": "errors", "InputError": "errors", "StoreError": "errors", "AlignmentError": "errors",
    # stores
    "IGNORE_INDEX": "store", "VOC_CLASSES": "store", "Stack": "store", "StackWriter": "store",
    "create_stack": "store", "open_stack": "store", "check_aligned": "store",
    "default_chunks": "store", "default_compressors": "store",
    # ingest
    "DEFAULT_BG_THRESHOLD": "ingest", "read_ids": "ingest", "resolve_classes": "ingest",
    "ingest_labels": "ingest", "ingest_scores": "ingest", "ingest_images": "ingest",
    "ingest_tiff": "ingest", "ingest_arrays": "ingest", "ingest_dask": "ingest",
    # step 1: refinement
    "refine_stack": "refine", "register_refinement": "refine", "unregister_refinement": "refine",
    "available_refinements": "refine", "Refinement": "refine", "RefineChunk": "refine",
    "PrepareContext": "refine", "ENTRY_POINT_GROUP": "refine",
    # step 2: evaluation, selection, subsets
    "evaluate": "evaluate", "Evaluation": "evaluate",
    "select": "selection", "Selection": "selection",
    "subset_analysis": "subsets", "SubsetAnalysis": "subsets",
    # step 3: the ensemble
    "merge": "merge", "MergeResult": "merge", "merge_images": "merge", "ensemble_scores": "merge",
    "POLICIES": "merge", "STRATEGIES": "merge",
    "report": "report", "export_pngs": "report",
    # step 4: DeepLabV3+
    "DeepLabV3Plus": "deeplab", "build_deeplab": "deeplab",
    "SegmentationDataset": "data", "make_loader": "data",
    "TrainConfig": "train", "TrainResult": "train", "train": "train",
    "predict": "predict", "PredictResult": "predict", "load_model": "predict",
    "resolve_threads": "predict", "ThreadGovernor": "predict",
    # synthetic data
    "make_voc_like": "datasets", "SyntheticDataset": "datasets", "default_quality": "datasets",
    "voc_palette": "datasets", "write_label_png": "datasets", "read_label_png": "datasets",
    # backend switch
    "BACKENDS": "backend", "get_kernels": "backend", "resolve_backend": "backend",
    "gpu_available": "backend", "describe_backend": "backend", "tune_allocator": "backend",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'isle_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
