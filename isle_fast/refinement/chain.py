"""Step 1 of ISLE (Algorithm 1): refine a pseudo-label set with a chain of plug-in refinements.

A *refinement* maps one chunk of a stack (a few whole images, with the matching
RGB chunk and the true shape of every image in it) to a refined chunk. The
paper refines DRS, PMM and PuzzleCAM with AffinityNet then a dense CRF; any
other refinement plugs in the same way:

* **by call**: ``register_refinement("name", factory)`` or as a decorator
  ``@register_refinement("name")`` on a class / function;
* **by entry point**: a distribution declares, in the group
  ``isle_fast.refinements``, ``name = package.module:factory``; it is found the
  first time ``name`` is asked for (``isle refine --with name``).

A *factory* takes the refinement's parameters as keyword arguments
(``--param name.key=value`` on the command line) and returns either a
:class:`Refinement` or a plain callable ``f(chunk: RefineChunk) -> ndarray``
(which must return the chunk's own encoding).

A minimal plug-in (a label-map median filter)::

    from isle_fast.refinement.chain import Refinement, register_refinement

    @register_refinement("median")
    class Median(Refinement):
        needs_rgb = False

        def __init__(self, size: int = 3):
            self.size = size

        def params(self):
            return {"size": self.size}

        def refine(self, chunk):          # chunk.data: (k, H, W) labels or (k, H, W, C) scores
            from scipy.ndimage import median_filter
            out = chunk.data.copy()
            size = (self.size, self.size) + (1,) * (chunk.data.ndim - 3)   # not across classes
            for i, (h, w) in enumerate(chunk.shapes):
                out[i, :h, :w] = median_filter(chunk.data[i, :h, :w], size=size)
            return out

then ``isle refine SET --with median,crf --param median.size=5 ...``; or, from
another package, ``entry_points={"isle_fast.refinements": ["median = mypkg.refs:Median"]}``.

Data inside a chain
-------------------
Every refinement sees a :class:`RefineChunk`. ``labels`` chunks are the
``(k, H, W)`` uint8 label maps (255 = unknown / padding); ``scores`` chunks
are ``(k, H, W, C)`` **float32 probabilities in [0, 1]** (stored ``uint8``
scores are divided by :attr:`Stack.score_scale` first), background slice 0
included. Arrays are padded to the store's padded shape; refinements work
on ``data[i, :h, :w]`` of each image (``shapes[i] = (h, w)``) and the runner
resets the padding (255 / 0) after every step, so padding never leaks into a
refined image. The final chunk is encoded for the output store (scores:
``round(255 p)`` for ``uint8``, a cast for ``float16`` / ``float32``, each
keeping every pixel's argmax: :func:`isle_fast.stores.stack.quantize_scores`).
Image-level labels, when the run has them, reach every step as
``chunk.image_labels`` (the dense CRF then uses exactly the image's classes).

Class-sparse sets
-----------------
A class-sparse score store (:mod:`isle_fast.stores.sparse`) is read as it is
stored, never through its dense view: the chunk's ``data`` is ``(k, H, W, 1 + K)``
slots (background, then each image's classes, ``chunk.keys``). Refinements
with ``sparse_input`` (the CRF and AffinityNet) work on the slots and return
:class:`SparseScores`; any other gets the dense block. The output is then
class-sparse too (``layout``): the classes each image's refined scores hold
and, as refined scores have no constant background, the background slice per
pixel. Its dense view equals the dense refine's output exactly.

Running
-------
:func:`refine_stack` builds one Dask task per block of images (the output
store's chunks, so tasks never write the same chunk); each task reads its
block, runs the whole chain and writes the result into the output store
being built. ``scheduler='auto'`` picks a process pool when a refinement
holds the GIL (``gil_bound``, e.g. pydensecrf) and threads otherwise; a
``dask.distributed`` client runs it on a cluster. The output appears only when
complete (:func:`isle_fast.stores.stack.create_stack` + commit) and its provenance
records the source, the chain and every parameter.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import math
import os
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from isle_fast.errors import InputError, param
from isle_fast.stores.image_labels import normalize_image_labels
from isle_fast.stores.stack import (
    IGNORE_INDEX,
    WRITE_EVERY_CHUNK,
    Stack,
    check_aligned,
    create_stack,
    default_chunks,
    open_stack,
    quantize_scores,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "RefineChunk",
    "SparseScores",
    "Refinement",
    "PrepareContext",
    "register_refinement",
    "unregister_refinement",
    "available_refinements",
    "get_refinement",
    "make_refinement",
    "make_chain",
    "parse_params",
    "parse_chain",
    "apply_chain",
    "refine_stack",
    "image_labels_for",
    "shutdown_pool",
]

#: Entry-point group through which other packages add refinements.
ENTRY_POINT_GROUP = "isle_fast.refinements"

#: Built-in refinements, imported only when asked for (torch stays unimported for a CRF-only run).
_BUILTINS: dict[str, str] = {
    "crf": "isle_fast.refinement.crf:DenseCRF",
    "affinity": "isle_fast.refinement.affinity:AffinityNetRefinement",
}

_REGISTRY: dict[str, Callable[..., Any]] = {}


# ----------------------------------------------------------------------------------------------
# The plug-in interface
# ----------------------------------------------------------------------------------------------
@dataclass
class RefineChunk:
    """One block of images as a refinement sees it.

    Attributes
    ----------
    data : ndarray
        ``(k, H, W)`` uint8 labels or ``(k, H, W, C)`` float32 probabilities (see module docs).
    encoding : {'labels', 'scores'}
    shapes : (k, 2) int64 array
        True ``(h, w)`` of each image; ``data[i, :h, :w]`` is the image, the rest padding.
    rgb : (k, H, W, 3) uint8 array or None
        The matching images (``None`` when the run has no image store).
    classes : tuple of str
        Class names, background first (``C = len(classes)``).
    ids : list of str
        Image ids of the block.
    start : int
        Position of the first image in the store.
    image_labels : (k, C) bool array or None
        The images' image-level labels (background column True) when the run has
        them (:func:`refine_stack`'s ``image_labels`` or the source store's).
    keys : (k, K) uint8 array or None
        Set for **class-sparse** scores (a class-sparse source store,
        :mod:`isle_fast.stores.sparse`): ``data`` is then ``(k, H, W, 1 + K)``,
        slot 0 the background and slot ``j + 1`` the scores of class ``keys[i, j]``
        (ascending; 0 = an unused slot, all zero); every class without a slot
        scores 0. Only refinements with ``sparse_input`` get such chunks.
    """

    data: np.ndarray
    encoding: str
    shapes: np.ndarray
    rgb: np.ndarray | None
    classes: tuple[str, ...]
    ids: list[str]
    start: int = 0
    image_labels: np.ndarray | None = None
    keys: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def slot_classes(self) -> np.ndarray:
        """``(k, 1 + K)`` int64: the class of every slot of a class-sparse chunk (slot 0: background).

        Unused slots (key 0) are all zero and also say 0.
        """
        if self.keys is None:
            raise InputError("slot_classes: the chunk is dense")
        return np.concatenate([np.zeros((len(self), 1), np.int64), self.keys.astype(np.int64)], axis=1)

    def dense(self) -> "RefineChunk":
        """The chunk with dense ``(k, H, W, C)`` scores (itself when it is dense already)."""
        if self.keys is None:
            return self
        return replace(self, data=slots_to_dense(self.data, self.keys, self.num_classes), keys=None)


@dataclass
class SparseScores:
    """Class-sparse scores, as a refinement with ``sparse_input`` may return them for a class-sparse chunk.

    Attributes
    ----------
    data : (k, H, W, 1 + K) float array
        Slot 0 the background, slot ``j + 1`` the scores of class ``keys[i, j]`` (see :class:`RefineChunk`).
    keys : (k, K) uint8 array
        Per image the slot classes, ascending, in 1..C-1; unused slots (0) last, their scores 0.
    """

    data: np.ndarray
    keys: np.ndarray


def slots_to_dense(data: np.ndarray, keys: np.ndarray, num_classes: int) -> np.ndarray:
    """Dense ``(k, H, W, C)`` scores of class-sparse ``data`` ``(k, H, W, 1 + K)`` with slot classes ``keys``."""
    k = data.shape[0]
    out = np.zeros(data.shape[:3] + (num_classes,), dtype=data.dtype)
    out[..., 0] = data[..., 0]
    for m in range(k):
        for j, cls in enumerate(keys[m]):
            if cls:
                out[m, :, :, int(cls)] = data[m, :, :, j + 1]
    return out


def dense_to_slots(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class-sparse ``(slots (k, H, W, 1 + K), keys (k, K))`` of dense scores ``(k, H, W, C)``.

    The slots of an image are its foreground classes with a score above 0 somewhere (padding is 0);
    K is the most any image of the block has.
    """
    k, c = data.shape[0], data.shape[-1]
    present = data[..., 1:].reshape(k, data.shape[1] * data.shape[2], c - 1).max(axis=1, initial=0) > 0
    kk = int(present.sum(axis=1).max(initial=0))
    keys = np.zeros((k, kk), np.uint8)
    slots = np.zeros(data.shape[:3] + (1 + kk,), dtype=data.dtype)
    slots[..., 0] = data[..., 0]
    for m in range(k):
        cls = np.flatnonzero(present[m]) + 1
        keys[m, :cls.size] = cls
        slots[m, :, :, 1:1 + cls.size] = data[m][..., cls]
    return slots, keys


def compact_slots(q: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the foreground slots that are all zero; ``q`` ``(k, H, W, 1 + K)`` -> ``(fg slots, keys)``.

    Returns the foreground slots ``(k, H, W, K')`` and their keys ``(k, K')`` (K' the most an image
    keeps): the classes an image's stored scores hold, as :func:`isle_fast.stores.sparse.sparsify` keys them.
    """
    k = q.shape[0]
    fg = q[..., 1:]
    used = (fg.reshape(k, q.shape[1] * q.shape[2], fg.shape[-1]).max(axis=1, initial=0) > 0) & (keys > 0)
    kk = int(used.sum(axis=1).max(initial=0))
    out = np.zeros(q.shape[:3] + (kk,), dtype=q.dtype)
    new_keys = np.zeros((k, kk), np.uint8)
    for m in range(k):
        j = np.flatnonzero(used[m])
        order = j[np.argsort(keys[m, j], kind="stable")]
        new_keys[m, :order.size] = keys[m, order]
        out[m, :, :, :order.size] = fg[m][..., order]
    return out, new_keys


@dataclass
class PrepareContext:
    """What :meth:`Refinement.prepare` gets once, before any chunk runs.

    Attributes
    ----------
    source : Stack
        The chain's input set.
    images : Stack or None
        The RGB store.
    out : str
        Path of the output store (a refinement may keep files beside it, e.g. a checkpoint).
    resume : bool
        Continue interrupted training from a checkpoint where one exists.
    progress : bool
        Show progress bars.
    device : str
        Torch device for refinements that train or run a network (``'auto'``, ``'cpu'``, ``'cuda'``...).
    encoding : {'labels', 'scores'} or None
        The encoding this refinement receives (the source's, or the previous step's output).
    image_labels : (I, C) bool array or None
        The run's image-level labels (background column True), if any.
    """

    source: Stack
    images: Stack | None
    out: str
    resume: bool = False
    progress: bool = True
    device: str = "auto"
    extra: dict = field(default_factory=dict)
    encoding: str | None = None
    image_labels: np.ndarray | None = None


class Refinement:
    """Base class of refinements (subclass it, or register a plain function instead).

    Class attributes
    ----------------
    name : str
        Registry name (set by :func:`make_refinement` when the factory is registered).
    needs_rgb : bool
        Whether it reads ``chunk.rgb`` (then ``--images`` is required).
    gil_bound : bool
        Its work holds the GIL (pure-Python or a C extension that does not
        release it): ``scheduler='auto'`` runs such chains in processes.
    process_safe : bool
        It may be pickled into worker processes (False e.g. for a model held on a GPU).
    sparse_input : bool
        It takes class-sparse chunks (``chunk.keys`` set, see :class:`RefineChunk`) and
        returns labels, dense scores or :class:`SparseScores`; the others get the dense form.
    """

    name: str = "refinement"
    needs_rgb: bool = True
    gil_bound: bool = False
    process_safe: bool = True
    sparse_input: bool = False

    def params(self) -> dict:
        """JSON-ready parameters recorded in the output's provenance."""
        return {}

    def output_encoding(self, input_encoding: str) -> str:
        """Encoding of what :meth:`refine` returns for input of ``input_encoding``."""
        return input_encoding

    def prepare(self, context: PrepareContext) -> None:
        """Run once in the main process before any chunk (train a model, load a checkpoint...)."""

    def refine(self, chunk: RefineChunk) -> np.ndarray:  # pragma: no cover - abstract
        """The refined block: ``(k, H, W)`` uint8 labels or ``(k, H, W, C)`` float probabilities."""
        raise NotImplementedError

    def __call__(self, chunk: RefineChunk) -> np.ndarray:
        return self.refine(chunk)


class _FunctionRefinement(Refinement):
    """Wraps a plain callable ``f(chunk) -> ndarray`` (same encoding in and out)."""

    def __init__(self, name: str, fn: Callable[[RefineChunk], np.ndarray], params: dict):
        self.name = name
        self.fn = fn
        self._params = dict(params)
        self.needs_rgb = bool(getattr(fn, "needs_rgb", False))
        self.gil_bound = bool(getattr(fn, "gil_bound", False))

    def params(self) -> dict:
        return dict(self._params)

    def refine(self, chunk: RefineChunk) -> np.ndarray:
        return self.fn(chunk)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
def register_refinement(name: str, factory: Callable[..., Any] | None = None, *, overwrite: bool = False):
    """Register a refinement factory under ``name``; usable as a decorator.

    Parameters
    ----------
    name : str
        The name used in ``--with`` and ``--param name.key=value``; letters,
        digits, ``_`` and ``-``.
    factory : callable, optional
        ``factory(**params)`` returning a :class:`Refinement` or a callable
        ``f(chunk) -> ndarray``. Omit it to use ``register_refinement`` as a decorator.
    overwrite : bool
        Replace an existing registration of ``name`` (otherwise an error).

    Returns
    -------
    The factory (so the decorator form leaves the decorated object unchanged).
    """
    if not name or not all(ch.isalnum() or ch in "_-" for ch in name):
        raise InputError(f"refinement name {name!r} must be letters, digits, '_' or '-'")

    def _register(f: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(f):
            raise InputError(f"refinement {name!r}: factory {f!r} is not callable")
        if not overwrite and name in _REGISTRY and _REGISTRY[name] is not f:
            raise InputError(f"refinement {name!r} is already registered (pass overwrite=True to replace it)")
        _REGISTRY[name] = f
        return f

    if factory is None:
        return _register
    return _register(factory)


def unregister_refinement(name: str) -> None:
    """Forget a registration made with :func:`register_refinement` (no error if absent)."""
    _REGISTRY.pop(name, None)


def _entry_points() -> list:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def available_refinements() -> list[str]:
    """Names usable in a chain: built-ins, registered ones and entry points, sorted."""
    names = set(_BUILTINS) | set(_REGISTRY) | {ep.name for ep in _entry_points()}
    return sorted(names)


def get_refinement(name: str) -> Callable[..., Any]:
    """The factory registered as ``name`` (registry, then built-ins, then entry points).

    Raises
    ------
    InputError
        No such refinement (the message lists the available ones), or its entry point fails to load.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTINS:
        module, attr = _BUILTINS[name].split(":")
        return getattr(importlib.import_module(module), attr)
    for ep in _entry_points():
        if ep.name == name:
            try:
                factory = ep.load()
            except Exception as exc:
                raise InputError(f"refinement {name!r}: entry point {ep.value!r} in group "
                                 f"{ENTRY_POINT_GROUP!r} failed to load: {exc}") from None
            _REGISTRY[name] = factory
            return factory
    raise InputError(f"unknown refinement {name!r}; available: {', '.join(available_refinements())}")


def make_refinement(name: str, params: Mapping[str, Any] | None = None) -> Refinement:
    """Build refinement ``name`` with ``params``; unknown parameters are an error naming them."""
    factory = get_refinement(name)
    params = dict(params or {})
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        known = [p.name for p in sig.parameters.values()
                 if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        bad = sorted(set(params) - set(known))
        if bad:
            raise InputError(f"refinement {name!r} has no parameter {bad[0]!r} "
                             f"({param('params', f'{name}.{bad[0]}')}); its parameters: {', '.join(known) or 'none'}")
    try:
        obj = factory(**params)
    except InputError:  # (also a ValueError) already names the parameter
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(f"refinement {name!r}: bad parameters {params}: {exc}") from None
    if isinstance(obj, Refinement):
        obj.name = name
        return obj
    if callable(obj):
        return _FunctionRefinement(name, obj, params)
    raise InputError(f"refinement {name!r}: factory returned {type(obj).__name__}, not a refinement")


def parse_chain(chain: str | Sequence[str]) -> list[str]:
    """``'affinity,crf'`` or ``['affinity', 'crf']`` -> ``['affinity', 'crf']`` (order kept)."""
    names = [s.strip() for s in chain.split(",")] if isinstance(chain, str) else [str(s).strip() for s in chain]
    names = [s for s in names if s]
    if not names:
        raise InputError(f"{param('chain')} needs at least one refinement "
                         f"(e.g. {param('chain', 'affinity,crf')})")
    return names


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        low = text.lower()
        if low in ("true", "yes", "on"):
            return True
        if low in ("false", "no", "off"):
            return False
        return text


def parse_params(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Turn ``['crf.iterations=5', ...]`` (or ``{'crf.iterations': 5}`` / ``{'crf': {...}}``) into
    ``{'crf': {'iterations': 5}}``.

    Values are parsed as JSON where they parse (``5``, ``0.7``, ``true``, ``[1,2]``), else kept as strings.
    """
    out: dict[str, dict[str, Any]] = {}
    if items is None:
        return out
    if isinstance(items, Mapping):
        for key, val in items.items():
            if isinstance(val, Mapping):
                out.setdefault(str(key), {}).update(dict(val))
            else:
                name, dot, par = str(key).partition(".")
                if not dot or not name or not par:
                    raise InputError(f"parameter {key!r} must look like NAME.KEY (e.g. crf.iterations)")
                out.setdefault(name, {})[par] = val
        return out
    for item in items:
        key, eq, text = str(item).partition("=")
        name, dot, par = key.strip().partition(".")
        if not eq or not dot or not name or not par:
            raise InputError(f"{param('params')} {item!r} must look like NAME.KEY=VALUE "
                             "(e.g. crf.iterations=5)")
        out.setdefault(name, {})[par.strip()] = _value(text.strip())
    return out


def make_chain(chain: str | Sequence[str], params: Any = None) -> list[Refinement]:
    """Build the refinements of ``chain`` with their parameters (see :func:`parse_params`)."""
    names = parse_chain(chain)
    by_name = parse_params(params)
    stray = sorted(set(by_name) - set(names))
    if stray:
        raise InputError(f"{param('params')} {stray[0]}.* given but {stray[0]!r} is not in the chain "
                         f"({','.join(names)})")
    return [make_refinement(n, by_name.get(n, {})) for n in names]


# ----------------------------------------------------------------------------------------------
# Running a chain on one block
# ----------------------------------------------------------------------------------------------
def _valid(shapes: np.ndarray, h_pad: int, w_pad: int) -> np.ndarray:
    rows = np.arange(h_pad)[None, :, None] < shapes[:, 0][:, None, None]
    cols = np.arange(w_pad)[None, None, :] < shapes[:, 1][:, None, None]
    return rows & cols


def _check_sparse_output(r: Refinement, chunk: RefineChunk, out: SparseScores) -> SparseScores:
    """A refinement's class-sparse scores checked (shapes, keys) and cleaned as :func:`_check_output`."""
    from isle_fast.stores.sparse import check_keys

    k, h_pad, w_pad = chunk.data.shape[:3]
    data, keys = np.asarray(out.data), np.asarray(out.keys)
    if chunk.encoding != "scores" or r.output_encoding(chunk.encoding) != "scores":
        raise InputError(f"refinement {r.name!r} returned class-sparse scores for a {chunk.encoding} chunk "
                         f"whose output is {r.output_encoding(chunk.encoding)}")
    if (data.ndim != 4 or data.shape[:3] != (k, h_pad, w_pad) or keys.ndim != 2
            or keys.shape != (k, data.shape[3] - 1)):
        raise InputError(f"refinement {r.name!r} returned class-sparse scores of shape {data.shape} with keys "
                         f"{keys.shape} for images {chunk.ids[:3]}...; expected ({k}, {h_pad}, {w_pad}, 1 + K) "
                         f"and ({k}, K)")
    if keys.size and (keys.dtype.kind not in "iu" or keys.min() < 0 or keys.max() >= chunk.num_classes):
        raise InputError(f"refinement {r.name!r} returned slot classes {np.unique(keys).tolist()} for images "
                         f"{chunk.ids[:3]}...; they must be integers in 1..{chunk.num_classes - 1} (0 = unused)")
    check_keys(f"refinement {r.name!r} (images {chunk.ids[:3]}...)", keys.astype(np.uint8), chunk.num_classes)
    data = np.nan_to_num(data.astype(np.float32, copy=True), nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(data, 0.0, 1.0, out=data)
    data[~_valid(chunk.shapes, h_pad, w_pad)] = 0.0
    data[..., 1:][np.broadcast_to((keys == 0)[:, None, None, :], data[..., 1:].shape)] = 0.0
    return SparseScores(data=data, keys=keys.astype(np.uint8))


def _check_output(r: Refinement, chunk: RefineChunk, out: np.ndarray, encoding: str) -> np.ndarray:
    k, h_pad, w_pad = chunk.data.shape[:3]
    want = (k, h_pad, w_pad) if encoding == "labels" else (k, h_pad, w_pad, chunk.num_classes)
    out = np.asarray(out)
    if out.shape != want:
        raise InputError(f"refinement {r.name!r} returned shape {out.shape} for images {chunk.ids[:3]}...; "
                         f"expected {want} ({encoding})")
    valid = _valid(chunk.shapes, h_pad, w_pad)
    if encoding == "labels":
        out = out.astype(np.uint8, copy=True)
        out[~valid] = IGNORE_INDEX
    else:
        out = np.nan_to_num(out.astype(np.float32, copy=True), nan=0.0, posinf=1.0, neginf=0.0)
        np.clip(out, 0.0, 1.0, out=out)
        out[~valid] = 0.0
    return out


def apply_chain(chain: Sequence[Refinement], chunk: RefineChunk) -> RefineChunk:
    """Run ``chain`` on one chunk, in order; padding is reset after every step.

    A class-sparse chunk (``chunk.keys`` set) stays class-sparse through the steps with
    ``sparse_input`` that return :class:`SparseScores`; a step without it gets the dense form.
    """
    for r in chain:
        enc = r.output_encoding(chunk.encoding)
        if enc not in ("labels", "scores"):
            raise InputError(f"refinement {r.name!r} declares output encoding {enc!r}")
        if chunk.keys is not None and not r.sparse_input:
            chunk = chunk.dense()
        out = r(chunk)
        if isinstance(out, SparseScores):
            sp = _check_sparse_output(r, chunk, out)
            chunk = replace(chunk, data=sp.data, keys=sp.keys, encoding=enc)
        else:
            chunk = replace(chunk, data=_check_output(r, chunk, out, enc), encoding=enc, keys=None)
    return chunk


def _encode(data: np.ndarray, encoding: str, dtype: np.dtype) -> np.ndarray:
    if encoding == "labels":
        return data.astype(np.uint8, copy=False)
    return quantize_scores(data, dtype)  # every pixel's argmax kept (uint8 / float16 rounding)


_OPEN: dict[tuple[str, str], Stack] = {}


def _open_cached(path: str, token: str) -> Stack:
    """Open a store once per run and process (``token`` identifies the run)."""
    st = _OPEN.get((path, token))
    if st is None:
        if len(_OPEN) > 16:
            _OPEN.clear()
        st = _OPEN[(path, token)] = open_stack(path)
    return st


@dataclass
class _Job:
    source: str
    images: str | None
    target: str            # the output group being written (its temporary path)
    target_array: str      # 'labels' or 'scores'
    out_dtype: str
    chain: list
    token: str = ""
    layout: str = "dense"  # of a scores output: 'dense' or 'sparse' (class-sparse, isle_fast.stores.sparse)
    blocks: str | None = None  # sparse: the folder of each task's foreground slots until they are assembled


def image_labels_for(stack: Stack, image_labels: Any = None) -> np.ndarray | None:
    """The run's image-level labels as an ``(I, C)`` bool array (background column True), or None.

    Parameters
    ----------
    stack : Stack
        The set being refined (``I`` images, ``C`` classes).
    image_labels : array, optional
        ``(I, C)`` (every class; the background column is ignored) or
        ``(I, C-1)`` (foreground only, the form of the public ``cls_labels.npy``),
        booleans or 0 / 1, in the store's image order. ``None``: the store's own
        image-level labels (``stack.image_labels``) when it holds them.

    Raises
    ------
    InputError
        Wrong shape or values (the message names the store).
    """
    source = "given"
    if image_labels is None:
        image_labels = getattr(stack, "image_labels", None)
        if callable(image_labels):
            image_labels = image_labels()
        if image_labels is None:
            return None
        source = f"held by {stack.path}"
    a = np.asarray(image_labels)
    n, c = stack.num_images, stack.num_classes
    if a.ndim != 2 or a.shape[0] != n or a.shape[1] not in (c, c - 1):
        raise InputError(f"image labels ({source}) have shape {a.shape}; {stack.path} has {n} images and {c} "
                         f"classes, so they must be ({n}, {c}) or, foreground only, ({n}, {c - 1})")
    return normalize_image_labels(a, c, f"image labels ({source})")


def read_sparse_block(src: Stack, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start:stop`` of a class-sparse score store as ``(slots, keys)``, without its dense view.

    ``slots`` is ``(k, H, W, 1 + K)`` float32 in [0, 1] (slot 0 the background: the store's level
    inside each image, or its stored slice; 0 in the padding), ``keys`` ``(k, K)`` uint8
    (:class:`RefineChunk`).
    """
    from isle_fast.stores.sparse import BACKGROUND_ATTR, BACKGROUND_MEMBER, BACKGROUND_STORED

    cams = np.asarray(src.member("cams")[start:stop])
    keys = np.asarray(src.sparse_keys[start:stop], dtype=np.uint8)
    scale = np.float32(src.score_scale)
    data = np.empty(cams.shape[:3] + (1 + cams.shape[3],), np.float32)
    data[..., 1:] = cams.astype(np.float32) / scale
    level = src.attrs[BACKGROUND_ATTR]
    if level == BACKGROUND_STORED:
        data[..., 0] = np.asarray(src.member(BACKGROUND_MEMBER)[start:stop]).astype(np.float32) / scale
    else:
        data[..., 0] = np.where(src.valid_mask(start, stop), np.float32(int(level)) / scale, np.float32(0))
    return data, keys


def _run_block(job: _Job, start: int, stop: int, image_labels: np.ndarray | None = None) -> Any:
    """One task: read images ``start:stop``, run the chain, write the result.

    Returns the number of images, or for a class-sparse output ``(start, keys)`` (its foreground
    slots wait in ``job.blocks`` until :func:`_assemble_sparse` knows the store's K).
    """
    import zarr

    src = _open_cached(job.source, job.token)
    keys = None
    if src.encoding == "scores" and src.score_layout == "sparse":
        data, keys = read_sparse_block(src, start, stop)   # only the classes present (and background)
    elif src.encoding == "scores":
        data = np.asarray(src.array[start:stop]).astype(np.float32) / np.float32(src.score_scale)
    else:
        data = np.asarray(src.array[start:stop])
    rgb = np.asarray(_open_cached(job.images, job.token).array[start:stop]) if job.images else None
    chunk = RefineChunk(data=data, encoding=src.encoding, shapes=src.shapes[start:stop].copy(), rgb=rgb,
                        classes=tuple(src.classes), ids=src.ids[start:stop], start=start,
                        image_labels=image_labels, keys=keys)
    chunk = apply_chain(job.chain, chunk)
    group = zarr.open_group(job.target, mode="r+")
    if chunk.encoding == "scores" and job.layout == "sparse":
        slots, slot_keys = (chunk.data, chunk.keys) if chunk.keys is not None else dense_to_slots(chunk.data)
        q = quantize_scores(slots, np.uint8)   # per pixel over its image's slots: the dense store's values
        fg, fg_keys = compact_slots(q, slot_keys)
        from isle_fast.stores.sparse import BACKGROUND_MEMBER

        bg: Any = group[BACKGROUND_MEMBER]   # an array: made by _start_sparse
        bg.with_config(WRITE_EVERY_CHUNK)[start:stop] = q[..., 0]
        assert job.blocks is not None
        np.save(os.path.join(job.blocks, f"{start}.npy"), fg)
        return start, fg_keys
    data = chunk.data if chunk.keys is None else chunk.dense().data
    member: Any = group[job.target_array]  # an array: the refine target made by create_stack
    target = member.with_config(WRITE_EVERY_CHUNK)  # an all-255 chunk is written too
    target[start:stop] = _encode(data, chunk.encoding, np.dtype(job.out_dtype))
    return stop - start


def _assemble_sparse(group: Any, blocks: str, results: Sequence[tuple[int, np.ndarray]], n: int, k: int,
                     h_pad: int, w_pad: int) -> None:
    """Write ``cams`` and ``keys`` of a class-sparse output from the tasks' blocks, one block at a time.

    K is the most classes any image keeps (at least 1); a block with fewer slots is padded with
    unused ones.
    """
    from isle_fast.stores.stack import default_compressors

    kk = max([1] + [int(r[1].shape[1]) for r in results])
    keys = np.zeros((n, kk), np.uint8)
    cams = group.create_array("cams", shape=(n, h_pad, w_pad, kk), chunks=(k, h_pad, w_pad, kk),
                              dtype=np.uint8, fill_value=0,
                              compressors=default_compressors("scores")).with_config(WRITE_EVERY_CHUNK)
    for start, bkeys in sorted(results, key=lambda r: r[0]):
        path = os.path.join(blocks, f"{start}.npy")
        fg = np.load(path)
        m, kb = bkeys.shape
        keys[start:start + m, :kb] = bkeys
        block = np.zeros((m, h_pad, w_pad, kk), np.uint8)
        block[..., :kb] = fg
        cams[start:start + m] = block
        os.remove(path)
    ka = group.create_array("keys", shape=(n, kk), chunks=(max(n, 1), kk), dtype=np.uint8, fill_value=0,
                            compressors=default_compressors()).with_config(WRITE_EVERY_CHUNK)
    if n:
        ka[:] = keys


# ----------------------------------------------------------------------------------------------
# Whole-store driver
# ----------------------------------------------------------------------------------------------
#: ``scheduler='auto'`` uses worker processes for a GIL-bound chain only from this many pixels
#: (about 27 VOC images) or when a pool of the right size is already running: starting
#: processes costs a few seconds, more than a small CRF job takes in one process.
PROCESS_MIN_PIXELS = 5_000_000

_POOL: dict[str, Any] = {}


def _process_pool(n: int):
    """A process pool of ``n`` workers (spawned), kept for later runs in this process."""
    if _POOL.get("n") != n or getattr(_POOL.get("pool"), "_broken", False):
        old = _POOL.pop("pool", None)
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _POOL["pool"] = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))
        _POOL["n"] = n
        if not _POOL.get("atexit"):
            import atexit

            atexit.register(shutdown_pool)
            _POOL["atexit"] = True
    return _POOL["pool"]


def shutdown_pool() -> None:
    """Stop the worker processes kept by ``scheduler='processes'`` (they also stop at exit)."""
    pool = _POOL.pop("pool", None)
    _POOL.pop("n", None)
    if pool is not None:
        pool.shutdown(wait=True)


def _as_stack(x: Stack | str | os.PathLike, what: str) -> Stack:
    return x if isinstance(x, Stack) else open_stack(x)


def refine_stack(
    src: Stack | str | os.PathLike,
    images: Stack | str | os.PathLike | None,
    out: str | os.PathLike,
    chain: str | Sequence[str] = ("crf",),
    params: Any = None,
    *,
    workers: int | None = None,
    scheduler: str = "auto",
    client: Any = None,
    images_per_task: int | None = None,
    name: str | None = None,
    score_dtype: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    image_labels: Any = None,
    layout: str | None = None,
) -> Stack:
    """Refine a pseudo-label set with a chain of refinements and write a new store.

    Parameters
    ----------
    src : Stack or path
        The set to refine (encoding ``labels`` or ``scores``). Never modified.
    images : Stack or path or None
        The RGB store (kind ``images``) aligned with ``src``; required when a
        refinement reads RGB (CRF, AffinityNet).
    out : path
        The new store. It appears only when complete.
    chain : str or sequence of str
        Refinement names in order, e.g. ``['affinity', 'crf']`` or ``'affinity,crf'``.
    params : dict or list of str, optional
        ``{'crf': {'iterations': 5}}``, ``{'crf.iterations': 5}`` or ``['crf.iterations=5']``.
    workers : int, optional
        Parallel workers (default: CPU count). ``1`` runs in this process, in order.
    scheduler : {'auto', 'threads', 'processes', 'sync'}
        Dask scheduler. ``auto``: ``sync`` for one worker; ``processes`` when a
        refinement in the chain is ``gil_bound`` (the dense CRF), all are
        ``process_safe`` and the set has at least :data:`PROCESS_MIN_PIXELS`
        pixels (else ``sync``: starting processes would cost more than it saves);
        otherwise ``threads``. Ignored when ``client`` is given. Worker processes
        are started with ``spawn`` and kept for later calls (:func:`shutdown_pool`);
        scripts that use them need the ``if __name__ == "__main__":`` guard.
    client : dask.distributed.Client, optional
        Run the tasks on this cluster (its workers must see ``src``, ``images`` and ``out``).
    images_per_task : int, optional
        Images per task = images per output chunk (default: a quarter of an
        even share per worker, at most the store's default chunk).
    name : str, optional
        The output set's name (default ``'<source name>+<chain joined by +>'``).
    score_dtype : {'uint8', 'float16', 'float32'}, optional
        Storage type when the output is scores (default: the source's dtype, ``uint8`` for a label source).
    overwrite : bool
        Replace an existing ``out`` (only once the new store is complete).
    resume : bool
        Passed to refinements that train (AffinityNet resumes from its checkpoint).
    device : str
        Torch device for refinements with a network (``auto``: CUDA when available).
    progress : bool
        Show progress bars and print a summary.
    image_labels : (I, C) or (I, C-1) bool array, optional
        Image-level labels in the store's image order (see
        :func:`image_labels_for`); default: the source store's own, when it
        holds them. Each step gets its block's rows as ``chunk.image_labels``;
        the dense CRF then uses exactly each image's labelled classes.
    layout : {'auto', 'sparse', 'dense'}, optional
        Layout of a scores output. ``sparse``: a class-sparse store
        (:mod:`isle_fast.stores.sparse`: per image the classes its refined scores
        hold, and the background slice per pixel; ``uint8`` only, local disk);
        ``dense``: every class slice. ``auto`` / None (default): the source's
        layout (a class-sparse source is read and refined as such: only its
        images' classes and background go through the chain's built-in steps).
        Either layout holds the same scores (the dense view of a sparse output
        equals the dense output).

    Returns
    -------
    Stack
        The committed output store; its provenance holds ``refined_from``,
        ``images``, ``refinements`` (name + parameters of each step in order),
        ``image_labels`` (``'given'``, ``'store'`` or None), ``score_layout`` (of a
        scores output) and the source's provenance.
    """
    from isle_fast.progress import Timer

    timer = Timer()
    src, img, refs, labels = _refine_inputs(src, images, chain, params, image_labels)
    out = str(out)
    # never the input set or the images (nor inside / holding them), never what isle did not write
    from isle_fast.outputs import check_output

    check_output(out, overwrite=overwrite, inputs=[src] + ([img] if img is not None else []))
    enc, score_dtype = _output_encoding(src, refs, score_dtype)
    out_layout = _output_layout(src, enc, score_dtype, layout, out)
    n_workers, k = _task_size(src, enc, score_dtype, workers, images_per_task)

    ctx = PrepareContext(source=src, images=img, out=out, resume=resume, progress=progress, device=device,
                         image_labels=labels)
    step_encoding = src.encoding
    for r in refs:
        r.prepare(replace(ctx, encoding=step_encoding))
        step_encoding = r.output_encoding(step_encoding)
    sched = _scheduler(src, refs, scheduler, client, n_workers)

    prov = {
        "refined_from": src.path,
        "source_name": src.name,
        "source_provenance": src.provenance,
        "images": img.path if img is not None else None,
        "refinements": [{"name": r.name, "params": r.params()} for r in refs],
        "chain": [r.name for r in refs],
        "image_labels": None if labels is None else ("given" if image_labels is not None else "store"),
        **({"score_layout": out_layout} if enc == "scores" else {}),
    }
    h_pad, w_pad = src.padded_shape
    sparse = out_layout == "sparse"
    chunks = (k, h_pad, w_pad) + ((src.num_classes,) if enc == "scores" and not sparse else ())
    writer = create_stack(out, kind=src.kind if src.kind != "images" else "pseudo", classes=src.classes,
                          ids=src.ids, shapes=src.shapes, encoding="labels" if sparse else enc,
                          name=name or f"{src.name}+{'+'.join(r.name for r in refs)}",
                          score_dtype=score_dtype, chunks=chunks, provenance=prov, overwrite=overwrite,
                          padded_shape=(h_pad, w_pad))
    blocks = None
    try:
        from isle_fast.stores.stack import absolute_location

        if sparse:
            blocks = _start_sparse(writer, out, k)
        job = _Job(source=absolute_location(src.path),   # the tasks may run on cluster workers elsewhere
                   images=absolute_location(img.path) if img is not None else None, target=writer.work_path,
                   target_array=enc, out_dtype=score_dtype if enc == "scores" else "uint8", chain=refs,
                   token=uuid.uuid4().hex, layout=out_layout, blocks=None if blocks is None else str(blocks))
        results = _compute(job, labels, src.num_images, k, sched, client, n_workers,
                           f"refine {src.name} ({'+'.join(r.name for r in refs)})", progress)
        if blocks is not None:
            _assemble_sparse(writer.group, str(blocks), results, src.num_images, k, h_pad, w_pad)
        writer.set_provenance(scheduler=sched, workers=n_workers, images_per_task=k)
        stack = writer.commit()
    except BaseException:
        if blocks is not None:
            from isle_fast.outputs import remove_path

            remove_path(blocks)
        writer.abort()
        if sched == "processes":  # a failed or interrupted pool is not reused
            pool = _POOL.pop("pool", None)
            _POOL.pop("n", None)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        raise
    if blocks is not None:
        from isle_fast.outputs import remove_path

        remove_path(blocks)
    if progress:
        _refine_summary(src, stack, refs, labels is not None and prov["image_labels"], sched, n_workers, k,
                        timer.seconds)
    return stack


def _output_layout(src: Stack, enc: str, score_dtype: str, layout: str | None, out: str) -> str:
    """``'sparse'`` or ``'dense'``: the layout of a refine's output (``layout`` of :func:`refine_stack`)."""
    from isle_fast.stores.stack import is_remote

    choice = "auto" if layout is None else str(layout)
    if choice not in ("auto", "sparse", "dense"):
        raise InputError(f"{param('layout')} must be auto, sparse or dense, not {layout!r}")
    if choice == "auto":
        sparse_src = src.encoding == "scores" and src.score_layout == "sparse"
        ok = enc == "scores" and np.dtype(score_dtype) == np.uint8 and not is_remote(out)
        return "sparse" if sparse_src and ok else "dense"
    if choice == "sparse":
        if enc != "scores":
            raise InputError(f"{param('layout', 'sparse')}: the chain ends in label maps, not scores "
                             "(a label store has no score layout)")
        if np.dtype(score_dtype) != np.uint8:
            raise InputError(f"{param('layout', 'sparse')}: a class-sparse score store holds uint8 scores, "
                             f"not {score_dtype}")
        if is_remote(out):
            raise InputError(f"{out}: class-sparse stores are written to local disk only")
    return choice


def _start_sparse(writer: Any, out: str, k: int) -> Any:
    """Turn the labels skeleton of ``writer`` into a class-sparse score store; the folder for the blocks.

    ``cams`` and ``keys`` come at the end (:func:`_assemble_sparse`); the tasks write the stored
    background slice (``background``, chunked like ``cams``) and leave their slots in the folder.
    """
    from pathlib import Path

    from isle_fast.outputs import temp_path
    from isle_fast.stores.sparse import BACKGROUND_ATTR, BACKGROUND_MEMBER, BACKGROUND_STORED, LAYOUT_ATTR
    from isle_fast.stores.stack import SCORE_SCALE, default_compressors

    g = writer.group
    n, h_pad, w_pad = (int(v) for v in g["labels"].shape)
    del g["labels"]
    g.create_array(BACKGROUND_MEMBER, shape=(n, h_pad, w_pad), chunks=(k, h_pad, w_pad), dtype=np.uint8,
                   fill_value=0, compressors=default_compressors("scores"))
    g.attrs.update({"encoding": "scores", "score_scale": SCORE_SCALE, LAYOUT_ATTR: "sparse",
                    BACKGROUND_ATTR: BACKGROUND_STORED})
    blocks = temp_path(Path(out).absolute())   # beside the output: cluster workers see it too
    blocks.mkdir(parents=True)
    return blocks


def _refine_inputs(src: Any, images: Any, chain: str | Sequence[str], params: Any, image_labels: Any
                   ) -> tuple[Stack, Stack | None, list[Refinement], np.ndarray | None]:
    """The source and images stores (checked and aligned), the chain and the image labels of a refine."""
    src = _as_stack(src, "source")
    if src.encoding not in ("labels", "scores"):
        raise InputError(f"{src.path} is a {src.kind!r} store with encoding {src.encoding!r}; "
                         "refine needs a labels or scores set")
    refs = make_chain(chain, params)
    labels = image_labels_for(src, image_labels)
    img = _as_stack(images, "images") if images is not None else None
    if img is not None:
        if img.kind != "images" or img.encoding != "rgb":
            raise InputError(f"{param('images')} {img.path} is a {img.kind!r} store; "
                             "expected an 'images' (rgb) store")
        check_aligned([src, img], same_classes=False)
    need = [r.name for r in refs if r.needs_rgb]
    if need and img is None:
        raise InputError(f"refinement {need[0]!r} needs the RGB images: pass {param('images')} "
                         "(an images store)")
    return src, img, refs, labels


def _output_encoding(src: Stack, refs: Sequence[Refinement], score_dtype: str | None) -> tuple[str, str]:
    """The encoding the chain ends in and the output's score dtype (default: the source's)."""
    enc = src.encoding
    for r in refs:
        enc = r.output_encoding(enc)
    if score_dtype is None:
        score_dtype = str(src.array.dtype) if src.encoding == "scores" else "uint8"
    if score_dtype not in ("uint8", "float16", "float32"):
        raise InputError(f"score dtype must be uint8, float16 or float32, not {score_dtype!r}")
    return enc, score_dtype


def _task_size(src: Stack, enc: str, score_dtype: str, workers: int | None,
               images_per_task: int | None) -> tuple[int, int]:
    """``(workers, images per task)``: the defaults, or the given ones checked."""
    n = src.num_images
    h_pad, w_pad = src.padded_shape
    c = src.num_classes
    n_workers = int(workers) if workers else (os.cpu_count() or 1)
    if n_workers < 1:
        raise InputError(f"{param('workers')} must be at least 1, not {workers}")
    if images_per_task is None:
        k_default = default_chunks(max(n, 1), h_pad, w_pad, c if enc == "scores" else None,
                                   np.dtype(score_dtype).itemsize if enc == "scores" else 1)[0]
        images_per_task = max(1, min(k_default, math.ceil(n / (4 * n_workers)) if n else 1))
    k = int(images_per_task)
    if k < 1:
        raise InputError(f"images per task must be at least 1, not {images_per_task}")
    return n_workers, k


def _scheduler(src: Stack, refs: Sequence[Refinement], scheduler: str, client: Any, n_workers: int) -> str:
    """The Dask scheduler of a refine (see ``scheduler`` of :func:`refine_stack`), checked against the chain."""
    if client is not None:
        sched = "distributed"
    elif scheduler == "auto":
        pixels = int((src.shapes[:, 0] * src.shapes[:, 1]).sum())
        if n_workers == 1:
            sched = "sync"
        elif any(r.gil_bound for r in refs) and all(r.process_safe for r in refs):
            # starting worker processes costs seconds; for little work one process is faster
            big = pixels >= PROCESS_MIN_PIXELS or _POOL.get("n") == n_workers
            sched = "processes" if big else "sync"
        else:
            sched = "threads"
    elif scheduler in ("threads", "processes", "sync"):
        sched = scheduler
    else:
        raise InputError(f"{param('scheduler')} must be auto, threads, processes or sync, not {scheduler!r}")
    if sched == "processes" and not all(r.process_safe for r in refs):
        bad = next(r.name for r in refs if not r.process_safe)
        raise InputError(f"refinement {bad!r} cannot run in worker processes here (its model is on a GPU); "
                         f"use {param('scheduler', 'threads')}")
    return sched


def _compute(job: _Job, labels: np.ndarray | None, n: int, k: int, sched: str, client: Any, n_workers: int,
             desc: str, progress: bool) -> list:
    """Run the job's blocks of ``k`` images (one task each) on the chosen scheduler; their results."""
    import dask

    from isle_fast.progress import dask_progress

    tasks = [dask.delayed(_run_block, pure=False)(job, s, min(n, s + k),
                                                  None if labels is None else labels[s:s + k])
             for s in range(0, n, k)]
    if not tasks:
        return []
    if sched == "distributed":
        with client.as_current(), dask_progress(desc, quiet=not progress, images=n):
            return list(dask.compute(*tasks))   # on the client's workers, the bar counting their tasks
    kwargs = {} if sched == "sync" else {"num_workers": n_workers}
    if sched == "processes":
        kwargs["pool"] = _process_pool(n_workers)
    with dask_progress(desc, quiet=not progress, images=n):
        return list(dask.compute(*tasks, scheduler=sched, **kwargs))


def _refine_summary(src: Stack, stack: Stack, refs: Sequence[Refinement], image_labels: Any, sched: str,
                    n_workers: int, k: int, seconds: float) -> None:
    """The end-of-run summary of :func:`refine_stack` (``image_labels``: where they came from, or False)."""
    from isle_fast.progress import summary

    summary(f"isle refine: {src.name} -> {stack.name}", {
        "chain": " -> ".join(f"{r.name}({', '.join(f'{a}={b}' for a, b in r.params().items())})"
                             for r in refs),
        "images": f"{src.num_images} ({sched}, {n_workers} worker{'s' if n_workers != 1 else ''}, {k} per task)",
        **({"image labels": image_labels} if image_labels is not False else {}),
        "seconds": f"{seconds:.1f}",
        "output": f"{stack.path} ({stack.encoding}, {stack.array.dtype}"
                  + (f", {stack.score_layout}" if stack.encoding == "scores" else "") + ")",
    })
