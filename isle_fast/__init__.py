"""isle-fast: ISLE, the class-wise ensemble of WSSS pseudo-labels, as a fast array pipeline.

The public API, in the order of the pipeline (see README.md; :mod:`isle_fast.stores.stack`
for the data model):

* stores: :func:`create_stack`, :func:`open_stack`, :class:`Stack`, :func:`check_aligned`,
  :func:`check_stack` (every chunk verified)
* ingest: :func:`ingest_labels`, :func:`ingest_scores`, :func:`ingest_images`,
  :func:`ingest_tiff`, :func:`ingest_arrays`, :func:`ingest_dask`; CAM layouts
  (:data:`CAM_LAYOUTS`), pickles loaded safely (:func:`load_pickle_npy`)
* image-level labels: :func:`ingest_image_labels`, :func:`read_image_labels`,
  :class:`ImageLabels` (``Stack.image_labels`` reads those stored with a stack)
* step 1, refinement: :func:`refine_stack`, :func:`register_refinement`, the dense
  CRF :func:`crf_image` with the public code's presets (:func:`crf_settings`)
* step 2, evaluation and selection: :func:`evaluate`, :func:`select`, :func:`subset_analysis`;
  with few pixel labels the uncertainty of every choice (:func:`selection_uncertainty`), with
  none an estimate from the sets (:func:`estimate`); every background threshold in one pass:
  :func:`sweep_thresholds`
* step 3, the ensemble: :func:`merge`, :func:`export_pngs`, :func:`report`
* the whole job from folders (``isle run``): :func:`run_job`, :class:`JobSpec`
* step 4, DeepLabV3+: :func:`build_deeplab`, :func:`train`, :func:`predict`
* data: :func:`make_voc_like` (synthetic VOC-like data sets), :func:`voc_palette`
* backend switch: :func:`get_kernels`, :func:`resolve_backend`, :func:`gpu_available`
* a ``dask.distributed`` cluster (``--scheduler``): :func:`connected`, :func:`scheduler_address`

Names are resolved lazily (PEP 562), so ``import isle_fast`` stays light and
torch is only imported by the functions that need it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: defining submodule -> the public names it provides
_MODULES: dict[str, tuple[str, ...]] = {
    "errors": ("IsleError", "InputError", "StoreError", "AlignmentError",),
    "stores.stack": (
        "IGNORE_INDEX", "VOC_CLASSES", "Stack", "StackWriter", "create_stack", "open_stack",
        "check_aligned", "default_chunks", "default_compressors", "quantize_scores",
    ),
    "stores.chunks": ("check_stack", "StoreCheck",),
    "stores.ingest": (
        "DEFAULT_BG_THRESHOLD", "read_ids", "resolve_classes", "ingest_labels", "ingest_scores",
        "ingest_images",
    ),
    "stores.ingest_tiff": ("ingest_tiff",),
    "stores.ingest_arrays": ("ingest_arrays", "ingest_dask",),
    "stores.image_labels": (
        "ImageLabels", "read_image_labels", "ingest_image_labels", "open_image_labels",
        "resolve_image_labels",
    ),
    "stores.cams": ("CAM_LAYOUTS",),
    "stores.formats": ("load_pickle_npy",),
    "refinement.chain": (
        "refine_stack", "register_refinement", "unregister_refinement", "available_refinements",
        "Refinement", "RefineChunk", "PrepareContext", "ENTRY_POINT_GROUP", "image_labels_for",
    ),
    "refinement.crf": ("crf_image", "crf_settings", "DenseCRF",),
    "ensemble.evaluate": ("evaluate", "Evaluation",),
    "ensemble.sweep": ("sweep_thresholds", "ThresholdSweep",),
    "ensemble.selection": ("select", "Selection",),
    "ensemble.uncertainty": ("selection_uncertainty", "choice_uncertainty", "Uncertainty",),
    "ensemble.estimate": ("estimate", "Estimate", "ESTIMATORS",),
    "ensemble.subsets": ("subset_analysis", "SubsetAnalysis",),
    "ensemble.merge": (
        "merge", "MergeResult", "merge_images", "ensemble_scores", "POLICIES", "STRATEGIES",
    ),
    "ensemble.report": ("report", "export_pngs",),
    "training.deeplab": ("DeepLabV3Plus", "build_deeplab",),
    "training.data": ("SegmentationDataset", "make_loader",),
    "training.config": ("TrainConfig",),
    "training.train": ("TrainResult", "train",),
    "training.predict": ("predict", "PredictResult", "load_model",),
    "training.runtime": ("resolve_threads", "ThreadGovernor",),
    "stores.png": ("voc_palette", "write_label_png", "read_label_png",),
    "synthetic.datasets": ("make_voc_like", "SyntheticDataset",),
    "synthetic.quality": ("default_quality",),
    "job": ("JobSpec", "JobResult", "run_job", "spec_from_root", "spec_from_toml",),
    "cluster": ("connected", "scheduler_address",),
    "backend": (
        "BACKENDS", "get_kernels", "resolve_backend", "gpu_available", "describe_backend",
        "tune_allocator",
    ),
}
#: public name -> defining submodule
_EXPORTS: dict[str, str] = {name: mod for mod, names in _MODULES.items() for name in names}

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
